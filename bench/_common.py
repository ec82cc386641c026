"""Small helpers shared by the benchmarks: timing, tables, the machine line, a random HF checkpoint."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def apply_preset(args, argv, presets: dict) -> None:
    """Preset values fill every argument the command line did not set explicitly."""
    if not args.preset:
        return
    given = argv if argv is not None else sys.argv[1:]
    explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in given if a.startswith("--")}
    for k, v in presets[args.preset].items():
        if k not in explicit:
            setattr(args, k, v)


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of ``fn()``; ``fn`` must block until its work is done."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: Sequence[float]) -> str:
    """``min-max`` of a list of seconds, for the noise column."""
    return f"{min(xs):.4f}-{max(xs):.4f}" if xs else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def machine_line() -> str:
    """CPU model and core count, plus the JAX backend and device, for the header of every table."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = "load avg " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "load avg n/a"
    dev = jax.devices()[0]
    return (f"host: {cpu}, {os.cpu_count()} cores, {load}; jax {jax.__version__} backend={jax.default_backend()} "
            f"({len(jax.devices())} x {dev.device_kind})")  # fmt: skip


def write_json(path: str | None, obj: dict) -> None:
    """``--json PATH``: the script's results, machine-readable (bench/device_check.py reads them)."""
    if not path:
        return
    import json

    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)  # a reader never sees half a file


def qwen2_config(*, vocab, hidden, layers, heads, kv_heads, mlp, tied, max_positions=4096):
    """The ``Qwen2Config`` of the benchmarks' random checkpoints (also what the planner reads as config.json)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=bool(tied), bos_token_id=1, eos_token_id=2, pad_token_id=0, use_sliding_window=False,
    )  # fmt: skip


def build_qwen2_checkpoint(path: str | None, *, vocab, hidden, layers, heads, kv_heads, mlp, tied, max_positions=4096,
                           seed=0):  # fmt: skip
    """A random-weight ``Qwen2ForCausalLM`` (fp32, CPU) saved to ``path`` (None: not saved); returns the torch model.

    transformers zero-inits the q/k/v biases; random ones make any parity check meaningful.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = qwen2_config(vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, mlp=mlp,
                          tied=tied, max_positions=max_positions)  # fmt: skip
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.02)
    if path is not None:
        model.save_pretrained(path)
    return model
