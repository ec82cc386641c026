"""LoRA sampling: decoding the adapted model as it is (ours) vs merging the adapters into a copy first.

The RL loop samples once per step with new adapters. Two ways to decode the adapted policy:

* **adapted** (what the trainer does): the sampler runs ``x·W + s·(x·A)·B`` (models/lora.py) on the
  frozen base and the adapters; nothing is copied;
* **merge + plain** (the peer): build ``W + s·A·B`` for every targeted weight (``lora.merged_state``, a
  second copy of those weights) and decode the plain model, timing the merge too: it must be redone
  every step, since the adapters change every update.

Both decode the same random-weight model (adapters with random B), prompts and number of new tokens
(no stop ids, so every rollout is ``--new-tokens`` long). The two alternate over ``--rounds`` so that
machine contention hits both; medians are reported.

    python bench/lora_sampler.py                              # CPU defaults (a narrow 4-layer model)
    python bench/lora_sampler.py --hidden 896 --layers 24 --heads 14 --kv-heads 2 --mlp 4864 \\
        --vocab 151936 --dtype bfloat16 --batch 256 --new-tokens 256 --rank 64     # Qwen2.5-0.5B shape (GPU)
"""

from __future__ import annotations

import argparse

from _common import machine_line, median, spread, table, timed


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 4), ("kv-heads", 2), ("mlp", 688),
                          ("vocab", 4096), ("batch", 32), ("prompt-len", 32), ("new-tokens", 64), ("rank", 16),
                          ("rounds", 5)):  # fmt: skip
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--targets", default="q,k,v,o,gate,up,down")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from echorl_jax.models import lora, peft_export
    from echorl_jax.models.config import ModelConfig
    from echorl_jax.models.transformer import Transformer
    from echorl_jax.sampling.config import SamplingConfig
    from echorl_jax.sampling.sampler import make_sampler

    args = parse_args(argv)
    mcfg = ModelConfig(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       max_position_embeddings=args.prompt_len + args.new_tokens, param_dtype=args.dtype,
                       compute_dtype=args.dtype)  # fmt: skip
    lcfg = lora.LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=tuple(args.targets.split(",")))
    model = lora.add_adapters(Transformer(mcfg, rngs=nnx.Rngs(0)), lcfg, seed=1)
    for weight, _, _ in lora.TARGETS.values():
        if hasattr(model, lora.b_name(weight)):
            var = getattr(model, lora.b_name(weight))
            var.set_value(0.02 * jax.random.normal(jax.random.key(len(weight)), var.get_value().shape))
    adapted_graphdef, adapted_state = nnx.split(model)
    plain_graphdef = nnx.graphdef(peft_export.merged_model(model))

    scfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    adapted = make_sampler(adapted_graphdef, scfg, group_size=1, stop_ids=(), pad_id=0)
    plain = make_sampler(plain_graphdef, scfg, group_size=1, stop_ids=(), pad_id=0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    lengths = np.full((args.batch,), args.prompt_len, np.int32)

    def run_adapted():
        jax.block_until_ready(adapted(adapted_state, prompts, lengths, 0).tokens)

    merged = {}

    def run_merge():
        merged["state"] = nnx.state(peft_export.merged_model(nnx.merge(adapted_graphdef, adapted_state)))
        jax.block_until_ready(jax.tree.leaves(merged["state"]))

    def run_plain():
        jax.block_until_ready(plain(merged["state"], prompts, lengths, 0).tokens)

    compile_s = {"adapted": timed(run_adapted), "merge": timed(run_merge), "plain": timed(run_plain)}
    times: dict[str, list[float]] = {"adapted": [], "merge": [], "plain": []}
    for _ in range(args.rounds):
        times["adapted"].append(timed(run_adapted))
        times["merge"].append(timed(run_merge))
        times["plain"].append(timed(run_plain))
    # Same draws: the merged model is the same function, so the rollouts agree (up to float ties).
    same = np.mean(np.asarray(adapted(adapted_state, prompts, lengths, 0).tokens)
                   == np.asarray(plain(merged["state"], prompts, lengths, 0).tokens))  # fmt: skip

    tokens = args.batch * args.new_tokens
    a, m, p = median(times["adapted"]), median(times["merge"]), median(times["plain"])
    print(machine_line())
    print(f"model h={args.hidden} L={args.layers} mlp={args.mlp} V={args.vocab} {args.dtype}; LoRA r={args.rank} on "
          f"{args.targets}; {args.batch} rows x {args.new_tokens} new tokens; {args.rounds} rounds; rollouts equal: "
          f"{same:.1%} of tokens; first calls (compile) adapted {compile_s['adapted']:.1f} s, merge "
          f"{compile_s['merge']:.1f} s, plain {compile_s['plain']:.1f} s")  # fmt: skip
    rows = [
        ["adapted (ours)", f"{a:.3f}", spread(times["adapted"]), f"{tokens / a:,.0f}", "1.00"],
        ["merge", f"{m:.3f}", spread(times["merge"]), "-", "-"],
        ["plain decode of the merged copy", f"{p:.3f}", spread(times["plain"]), f"{tokens / p:,.0f}", f"{p / a:.2f}"],
        ["merge + plain (peer)", f"{m + p:.3f}", "-", f"{tokens / (m + p):,.0f}", f"{(m + p) / a:.2f}"],
    ]
    print(table(["per sampling round", "median s", "min-max s", "tokens/s", "time / adapted"], rows))


if __name__ == "__main__":
    main()
