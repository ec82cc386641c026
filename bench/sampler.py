"""Sampler throughput: echorl_jax.sampling vs Hugging Face ``transformers`` ``generate``.

Both run the SAME random-weight Qwen2-shaped checkpoint (built here, saved to a
temp dir, loaded into ours with ``models.hf.load_model``), the same batch of
random prompts, the same number of new tokens and plain temperature-1.0
sampling with no early stop (HF: ``min_new_tokens = max_new_tokens``; ours: no
stop ids), so both produce exactly ``batch × new_tokens`` tokens. One timed run
each after a warm-up; our compile time is reported separately.

    python bench/sampler.py                       # CPU defaults
    python bench/sampler.py --preset qwen2.5-0.5b # GPU-sized (add --skip-peer without a torch GPU)
    python bench/sampler.py --workload longtail --batch 64 --group 4 --new-tokens 256 --slots 16
    python bench/sampler.py --preset qwen2.5-0.5b --workload longtail --batch 1024 --group 8 \
        --new-tokens 4096 --slots 256                # the issue-10 GPU target
    python bench/sampler.py --breakdown           # where one decode step's time goes

``--workload longtail``: rollout r stops at a length drawn from a log-normal
(median T/8, sigma 1, capped at T) through the sampler's bench-only hook
``bench_stop_lengths`` (the stop id is forced at that step). Runs of ours at
the same shape: *uniform* (every rollout T tokens, ``--slots`` rows),
*long-tail plain* (one row per rollout, the batch decodes until its longest
row stops) and *long-tail refill* (``sampling.slots``: a stopped row's slot
takes the next rollout), the long-tail ones twice: decode attention over the
*live blocks* of the cache (the default) and over the *whole cache* (one key
block of P + T columns: what the sampler did before it tracked the live
extent; the plain loop used to grow its cache in 4 segments, ``4 segments``
reads as it did); ``--runs`` picks some of them (keys in ``LONGTAIL_RUNS``);
runs with the same slots and key block share one compiled sampler. Timed in
``--rounds`` rounds, best kept. Reported: useful tokens/s
(tokens inside the response masks), slot occupancy (useful tokens / (decode
steps x rows)) and the bandwidth floor (every parameter and the whole KV
cache read once per step, at ``--bandwidth-gbs``). No peer in this mode.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

# --workload longtail: key -> the name printed in its table.
LONGTAIL_RUNS = {
    "uniform": "uniform", "plain-whole": "long-tail plain, whole cache", "plain-4seg": "long-tail plain, 4 segments",
    "plain-live": "long-tail plain, live blocks", "refill-whole": "long-tail refill, whole cache",
    "refill-live": "long-tail refill, live blocks",
}  # fmt: skip
PRESETS = {
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vocab=151936, tied=True,
                         dtype="bfloat16", batch=256, prompt_len=128, new_tokens=256),
}  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tied", type=int, default=1, help="tie embeddings (1/0)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--bandwidth-gbs", type=float, default=4800.0, help="memory bandwidth for the floor (H200: 4800)")
    ap.add_argument("--skip-peer", action="store_true", help="time only ours (e.g. GPU without torch CUDA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workload", choices=("uniform", "longtail"), default="uniform")
    ap.add_argument("--group", type=int, default=1, help="samples per prompt G (prompts = batch / G)")
    ap.add_argument("--slots", type=int, default=0, help="longtail: decode slots for refill (0: batch / 4)")
    ap.add_argument("--breakdown", action="store_true", help="time the pieces of one decode step instead")
    ap.add_argument("--rounds", type=int, default=3, help="longtail: timed rounds (each run once per round, best kept)")
    ap.add_argument("--runs", default=",".join(LONGTAIL_RUNS),
                    help=f"longtail: which runs, comma-separated, of {','.join(LONGTAIL_RUNS)}")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON (uniform and longtail workloads)")
    args = ap.parse_args(argv)
    unknown = set(args.runs.split(",")) - set(LONGTAIL_RUNS)
    if unknown:
        ap.error(f"--runs {args.runs!r}: unknown {sorted(unknown)}; allowed: {','.join(LONGTAIL_RUNS)}")
    if args.preset:
        explicit = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for k, v in PRESETS[args.preset].items():
            if k not in explicit:
                setattr(args, k, v)
    return args


def build_hf_checkpoint(args, path: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(args.seed)
    config = Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(4096, args.prompt_len + args.new_tokens), tie_word_embeddings=bool(args.tied),
        bos_token_id=1, eos_token_id=2, pad_token_id=0, use_sliding_window=False,
    )  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-inits q/k/v biases; random ones make the parity check meaningful
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.02)
    model.save_pretrained(path)
    return model


def load_ours(path: str, dtype: str):
    from echorl_jax.models.hf import load_model

    return load_model(path, param_dtype=dtype, compute_dtype=dtype)


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from echorl_jax.sampling.config import SamplingConfig
    from echorl_jax.sampling.sampler import make_sampler

    b, p, t = args.batch, args.prompt_len, args.new_tokens
    backend = jax.default_backend()
    print(f"backend={backend} devices={len(jax.devices())} ({jax.devices()[0].device_kind}) "
          f"cpu_cores={os.cpu_count()} model: hidden={args.hidden} layers={args.layers} heads={args.heads}/"
          f"{args.kv_heads} mlp={args.mlp} vocab={args.vocab} tied={bool(args.tied)} dtype={args.dtype}; "
          f"batch={b} prompt={p} new={t}")  # fmt: skip

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        hf_model = build_hf_checkpoint(args, tmp)
        model = load_ours(tmp, args.dtype)

    rng = np.random.default_rng(args.seed)
    prompts_np = rng.integers(3, args.vocab, size=(b, p), dtype=np.int32)
    lengths_n = np.full((b,), p, np.int32)

    # Parity check on a few prompts (fp32 torch on CPU): last-position logits.
    with torch.no_grad():
        k = min(4, b)
        hf_logits = hf_model(torch.from_numpy(prompts_np[:k]).long()).logits[:, -1].float().numpy()
    valid = jnp.ones((k, p), bool)
    our_logits, _ = model(jnp.asarray(prompts_np[:k]), jnp.cumsum(valid, 1) - 1, valid)
    parity = float(np.abs(np.asarray(our_logits[:, -1], np.float32) - hf_logits).max())

    # Ours: temperature 1.0, no stop ids -> exactly t tokens per row.
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=t)
    graphdef, state = nnx.split(model)
    if args.breakdown:
        return breakdown(args, model, state, cfg)
    if args.workload == "longtail":
        return longtail(args, graphdef, state, cfg, prompts_np)
    sample = make_sampler(graphdef, cfg, group_size=1, stop_ids=(), pad_id=0)
    t0 = time.perf_counter()
    jax.block_until_ready(sample(state, prompts_np, lengths_n, jax.random.key(0)))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(sample(state, prompts_np, lengths_n, jax.random.key(1)))
    ours_s = time.perf_counter() - t0
    assert int(np.asarray(out.lengths).sum()) == b * t, "ours did not produce batch x new_tokens tokens"
    ours_tps = b * t / ours_s

    peer_tps = None
    if not args.skip_peer:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        device = "cuda" if torch.cuda.is_available() and backend == "gpu" else "cpu"
        hf_model = hf_model.to(device=device, dtype=torch_dtype)
        ids = torch.from_numpy(prompts_np).long().to(device)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                  pad_token_id=0, eos_token_id=2)  # fmt: skip
        with torch.no_grad():
            hf_model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
            t0 = time.perf_counter()
            hf_out = hf_model.generate(ids, max_new_tokens=t, min_new_tokens=t, **kw)
            if device == "cuda":
                torch.cuda.synchronize()
            peer_s = time.perf_counter() - t0
        assert hf_out.shape == (b, p + t), f"transformers produced {tuple(hf_out.shape)}"
        peer_tps = b * t / peer_s

    # Memory-bandwidth floor per decode step: every parameter + the whole fixed-size KV cache is read.
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    dt_bytes = jnp.dtype(args.dtype).itemsize
    kv_bytes = 2 * args.layers * b * (p + t) * args.kv_heads * (args.hidden // args.heads) * dt_bytes
    step_bytes = param_bytes + kv_bytes

    print(f"\nlast-position logits, ours ({args.dtype}) vs transformers (fp32), {k} prompts: max |diff| = {parity:.2e}")
    print(f"\n| {'sampler':<28} | {'tokens/s':>10} | {'wall s':>8} |")
    print(f"|{'-' * 30}|{'-' * 12}|{'-' * 10}|")
    if peer_tps is not None:
        print(f"| {'transformers generate':<28} | {peer_tps:>10.0f} | {b * t / peer_tps:>8.2f} |")
    print(f"| {'echorl_jax (ours)':<28} | {ours_tps:>10.0f} | {ours_s:>8.2f} |")
    if peer_tps is not None:
        print(f"\nratio ours / transformers: {ours_tps / peer_tps:.2f}x")
    print(f"our first call (trace + compile + run): {first:.2f} s -> compile ~ {first - ours_s:.2f} s")
    print(f"decode-step bytes read: params {param_bytes / 1e6:.1f} MB + KV cache {kv_bytes / 1e6:.1f} MB "
          f"= {step_bytes / 1e6:.1f} MB")  # fmt: skip
    floor_s = step_bytes / (args.bandwidth_gbs * 1e9)
    if backend != "cpu":
        print(f"bandwidth floor at {args.bandwidth_gbs:.0f} GB/s: {floor_s * 1e3:.3f} ms/step -> "
              f"<= {b / floor_s:.0f} tokens/s; ours per step {ours_s / t * 1e3:.3f} ms "
              f"({floor_s / (ours_s / t):.0%} of floor)")  # fmt: skip
    C.write_json(args.json, {
        "workload": "uniform", "backend": backend, "device_kind": jax.devices()[0].device_kind, "dtype": args.dtype,
        "batch": b, "prompt_len": p, "new_tokens": t, "parity_max_abs": parity,
        "ours": {"tokens_per_s": ours_tps, "wall_s": ours_s, "first_call_s": first, "ms_per_step": ours_s / t * 1e3},
        "peer": None if peer_tps is None else {"name": "transformers generate", "tokens_per_s": peer_tps,
                                               "wall_s": b * t / peer_tps},
        "ratio_ours_over_peer": None if peer_tps is None else ours_tps / peer_tps,
        "floor": {"bandwidth_gbs": args.bandwidth_gbs, "ms_per_step": floor_s * 1e3, "tokens_per_s": b / floor_s},
    })  # fmt: skip

STOP_ID = 2  # the checkpoint's eos id: the long-tail workload forces it


def _timed(fn, *a, reps: int = 1):
    import jax

    jax.block_until_ready(fn(*a))  # compile + warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        out = jax.block_until_ready(fn(*a))
    return (time.perf_counter() - t0) / reps, out


def _step_bytes(args, state, rows: int) -> int:
    """Bytes one decode step must read: every parameter and the whole KV cache of ``rows`` rows."""
    import jax
    import jax.numpy as jnp

    param_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    kv = 2 * args.layers * rows * (args.prompt_len + args.new_tokens) * args.kv_heads * (args.hidden // args.heads)
    return param_bytes + kv * jnp.dtype(args.dtype).itemsize


def longtail(args, graphdef, state, cfg, prompts_np):
    """Uniform vs long-tail lengths (plain and slot refill, each reading the whole cache or only its
    live blocks) at one shape; see the module docstring."""
    import dataclasses

    import jax
    import numpy as np

    from echorl_jax.sampling.decode import decode_block, response_columns
    from echorl_jax.sampling.sampler import decode_rows, make_sampler

    b, p, t, g = args.batch, args.prompt_len, args.new_tokens, args.group
    if b % g:
        raise SystemExit(f"--batch {b} must be a multiple of --group {g}")
    n, slots = b // g, args.slots or max(1, b // 4)
    prompts, lengths = prompts_np[:n], np.full((n,), p, np.int32)
    draw = np.random.default_rng(args.seed + 1).normal(np.log(t / 8), 1.0, size=b)
    stop_at = np.clip(np.rint(np.exp(draw)), 1, t).astype(np.int32)
    live, whole = decode_block(t), response_columns(t, decode_block(t))
    print(f"\nlong-tail lengths (log-normal, median T/8 = {t // 8}, sigma 1, cap T = {t}): mean "
          f"{stop_at.mean():.0f}, median {np.median(stop_at):.0f}, p90 {np.percentile(stop_at, 90):.0f}, "
          f"max {stop_at.max()}; {n} prompts x G {g} = {b} rollouts; slots {slots}; key blocks of {live} "
          f"columns (live) or one block of {whole} (whole cache: every step reads all P + T columns)")  # fmt: skip
    print(f"\n| {'workload':<30} | {'rows':>5} | {'useful tok/s':>12} | {'wall s':>7} | {'steps':>6} | "
          f"{'occupancy':>9} | {'floor tok/s':>11} | {'of floor':>8} |")  # fmt: skip
    print("|" + "|".join("-" * w for w in (32, 7, 14, 9, 8, 11, 13, 10)) + "|")
    spec = {"uniform": (slots, np.full((b,), t, np.int32), live), "plain-whole": (0, stop_at, whole),
            "plain-4seg": (0, stop_at, whole // 4), "plain-live": (0, stop_at, live),
            "refill-whole": (slots, stop_at, whole), "refill-live": (slots, stop_at, live)}  # fmt: skip
    chosen = args.runs.split(",")
    runs = [(LONGTAIL_RUNS[key], *spec[key]) for key in LONGTAIL_RUNS if key in chosen]
    samplers, by_setting = {}, {}  # runs with the same slots and key block share one compiled sampler
    for name, s, lens, block in runs:
        if (s, block) not in by_setting:
            scfg = dataclasses.replace(cfg, slots=s)
            by_setting[s, block] = make_sampler(graphdef, scfg, group_size=g, stop_ids=(STOP_ID,), pad_id=0,
                                                decode_block=block)  # fmt: skip
            by_setting[s, block](state, prompts, lengths, jax.random.key(1), bench_stop_lengths=lens)  # compile + warm-up
        samplers[name] = by_setting[s, block]
    # Timed in rounds (each run once per round, best round kept) so that contention hits all alike. The
    # rollouts are the same every round (same key and lengths): the last one is kept for the counts.
    best = {name: float("inf") for name, *_ in runs}
    outs = {}
    for _ in range(args.rounds):
        for name, s, lens, block in runs:
            t0 = time.perf_counter()
            out = jax.block_until_ready(samplers[name](state, prompts, lengths, jax.random.key(1),
                                                       bench_stop_lengths=lens))  # fmt: skip
            best[name] = min(best[name], time.perf_counter() - t0)
            outs[name] = (out, int(samplers[name].last_decode_steps))
    results, report = {}, {}
    for name, s, lens, block in runs:
        sample = samplers[name]
        out, steps = outs[name]
        secs, useful = best[name], int(np.asarray(out.lengths).sum())
        rows = decode_rows(sample.cfg, b)[0]
        occupancy = useful / (steps * rows)
        floor_tps = rows * occupancy / (_step_bytes(args, state, rows) / (args.bandwidth_gbs * 1e9))
        results[name] = useful / secs
        report[name] = {"rows": rows, "useful_tokens_per_s": useful / secs, "wall_s": secs, "decode_steps": steps,
                        "occupancy": occupancy, "floor_tokens_per_s": floor_tps, "useful_tokens": useful}  # fmt: skip
        print(f"| {name:<30} | {rows:>5} | {useful / secs:>12.0f} | {secs:>7.2f} | {steps:>6} | {occupancy:>9.1%} | "
              f"{floor_tps:>11.0f} | {useful / secs / floor_tps:>8.1%} |")  # fmt: skip
    r = results
    pairs = (("live blocks / whole cache, plain", "long-tail plain, live blocks", "long-tail plain, whole cache"),
             ("live blocks / whole cache, refill", "long-tail refill, live blocks", "long-tail refill, whole cache"),
             ("refill / plain (live)", "long-tail refill, live blocks", "long-tail plain, live blocks"),
             ("refill (live) / uniform", "long-tail refill, live blocks", "uniform"))  # fmt: skip
    got = [(label, r[a] / r[b]) for label, a, b in pairs if a in r and b in r]
    if len(got) == len(pairs):  # every run: the line as it always read
        (_, pw), (_, rw), (_, rp), (_, ru) = got
        print(f"\nlive blocks / whole cache: plain {pw:.2f}x, refill {rw:.2f}x; refill / plain (live): {rp:.2f}x; "
              f"refill (live) / uniform: {ru:.2f}x (floor at {args.bandwidth_gbs:.0f} GB/s)")  # fmt: skip
    elif got:
        print("\n" + "; ".join(f"{label}: {x:.2f}x" for label, x in got))
    C.write_json(args.json, {
        "workload": "longtail", "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "dtype": args.dtype, "rollouts": b, "prompts": n, "group": g, "prompt_len": p, "new_tokens": t, "slots": slots,
        "lengths": {"mean": float(stop_at.mean()), "median": float(np.median(stop_at)),
                    "p90": float(np.percentile(stop_at, 90)), "max": int(stop_at.max())},
        "rounds": args.rounds, "runs": report,
    })  # fmt: skip


def breakdown(args, model, state, cfg):
    """Times the pieces of one decode step (each jitted alone) at the benchmark's shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from echorl_jax.models.transformer import init_cache
    from echorl_jax.sampling.draw import choose_tokens

    b, p, t = args.batch, args.prompt_len, args.new_tokens
    graphdef = nnx.graphdef(model)
    tok_b1 = jnp.full((b, 1), 5, jnp.int32)

    def step_at(slots: int):
        """One decode step over a full cache of ``slots`` slots, donated (updated in place, as in the loop)."""
        cache = init_cache(model.cfg, b, slots)
        cache = cache._replace(valid_bk=jnp.ones_like(cache.valid_bk), pos=jnp.asarray(slots - 1, jnp.int32))
        fn = jax.jit(lambda st, c: nnx.merge(graphdef, st)(tok_b1, jnp.full((b, 1), slots - 1), tok_b1 > 0, c),
                     donate_argnums=1)  # fmt: skip
        for _ in range(2):  # compile + warm-up
            cache = jax.block_until_ready(fn(state, cache))[1]._replace(pos=jnp.asarray(slots - 1, jnp.int32))
        t0 = time.perf_counter()
        for _ in range(5):
            cache = jax.block_until_ready(fn(state, cache))[1]._replace(pos=jnp.asarray(slots - 1, jnp.int32))
        return (time.perf_counter() - t0) / 5

    logits = jax.random.normal(jax.random.key(0), (b, args.vocab), jnp.float32) * 3
    keys = jax.random.split(jax.random.key(1), b)
    hidden = jnp.ones((b, args.hidden), jnp.dtype(args.dtype))
    head = jax.jit(lambda st, x: jnp.einsum("bh,hv->bv", x, nnx.merge(graphdef, st).output_head().astype(x.dtype),
                                            preferred_element_type=jnp.float32))  # fmt: skip
    rows = [
        ("model step, cache P+T slots", step_at(p + t)),
        ("model step, cache P+T/4 slots", step_at(p + t // 4)),
        ("model step, cache 1 slot", step_at(1)),
        ("output head alone [B,H]x[H,V]", _timed(head, state, hidden, reps=5)[0]),
        ("token choice, temperature 1", _timed(jax.jit(lambda l, k: choose_tokens(l, k, cfg)), logits, keys, reps=5)[0]),
    ]
    import dataclasses

    for label, c in (("top-p 0.95", dataclasses.replace(cfg, top_p=0.95)), ("top-k 50", dataclasses.replace(cfg, top_k=50))):
        rows.append((f"token choice, {label}", _timed(jax.jit(lambda l, k, c=c: choose_tokens(l, k, c)), logits, keys,
                                                      reps=5)[0]))  # fmt: skip
    print(f"\n| {'piece (batch ' + str(b) + ')':<34} | {'ms':>8} |")
    print(f"|{'-' * 36}|{'-' * 10}|")
    for label, secs in rows:
        print(f"| {label:<34} | {secs * 1e3:>8.2f} |")


if __name__ == "__main__":
    main()
