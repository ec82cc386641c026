"""Streaming rollouts (``sampling/stream.py``) vs synchronous slot-refill sampling, over ``--steps`` RL steps.

Both sides see the SAME stream of prompt batches: batch ``i`` holds N = ``--batch`` / ``--group`` random
prompts (full width P, no padding) and its N·G forced stop lengths, drawn from a log-normal like
``bench/sampler.py --workload longtail`` (median T/8, sigma 1, capped at T) by an RNG seeded with
(``--seed``, i), and it samples with the key ``fold_in(key(seed), i)`` on both sides (so a rollout draws the
same tokens, and stops early on the stop id at the same place, wherever it runs). The stop is forced at
those lengths through the bench-only hooks (``Sampler(..., bench_stop_lengths=)``, ``stop_at`` of
``StreamPool.draw``'s prompts).

* **sync** (the peer): step i samples batch i with ``Sampler`` and ``sampling.slots = --slots`` (a stopped
  rollout's slot takes the next one) and waits for the batch's last rollout.
* **stream k** (ours, one run per ``--staleness`` value): a ``StreamDecoder`` with a pool of
  ``--stream-batches`` × N prompt groups and the same S slots, driven by a ``StreamPool`` with bound k as
  the trainer's streaming source drives it: step s (policy version v = s - 1) calls ``drop_stale(v)`` (forgets
  groups holding a token more than k versions old), then ``draw``: admits batches while N entries are free,
  decodes until N groups are complete (the other slots stay mid-rollout for the next step) and harvests
  the N oldest complete groups. Each step harvests N groups, as sync does.

Every step decodes with the SAME parameters (no update runs between steps): this measures the decode
schedule (decode steps, slot occupancy, wall time), not learning; the version tags still move, so the
staleness bound drops groups as it would in training. Compile time is excluded: each sampler / decoder is
compiled and warmed up on a throw-away batch first, then the runs' steps alternate (step 1 of every run,
then step 2, ...) so that machine contention hits all alike.

Reported per run over the steps: decode steps (loop iterations), useful tokens (harvested: sum of the
rollouts' lengths), their mean length (streaming harvests the groups that complete first, so its harvest
is biased towards short groups when a bound drops long ones), slot occupancy (sync: useful tokens /
(decode steps × S); stream: the pool's counter, every token drawn / (decode steps × S), including tokens of
rollouts carried to the next step or later dropped), decode steps per 1,000 harvested tokens (the cost
that counts: wasted work shows here), ms per decode step, wall seconds per RL step, groups dropped by the
bound, and stream / sync ratios of decode steps per 1k tokens and of seconds per step (below 1: streaming
is better).

Two regimes (the header's ``regime`` line gives the bytes a decode step reads: all parameters vs the slots'
KV cache; ms per decode step of each run shows whether the schedule changes a step's cost):

    # (a) the issue's shape: a small model, a decode step costs little beyond loop overhead and KV reads
    python bench/streaming.py --batch 64 --group 4 --prompt-len 64 --new-tokens 256 --slots 16 \\
        --hidden 128 --layers 2 --mlp 344 --vocab 512
    # (b) weight-bound: reading the parameters (50 MB) dominates a decode step, with few or many live rows
    python bench/streaming.py --batch 64 --group 4 --prompt-len 64 --new-tokens 256 --slots 16 \\
        --hidden 768 --layers 2 --heads 12 --kv-heads 2 --mlp 2048 --vocab 512
    # (--hidden 1024 --heads 16 --mlp 2816, 90 MB, is weight-bound too but takes > 6 min on a shared 2-core CPU)
    python bench/streaming.py --steps 16 --staleness 1,2,4 --stream-batches 3 --json streaming.json

Decode slots compute whether live or idle (fixed shapes), so a decode step's cost does not fall with
occupancy; fewer decode steps for the same harvested tokens is the whole gain, and it turns into wall time
in the weight-bound regime (b), where a step's cost is the parameters' read. In regime (a) a streaming
decode step costs more than a sync one (its slots nearly always hold some long rollout, so the live-block
attention reads the whole window; ``--decode-block T`` reads the whole cache on both sides), which eats
part of the gain. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

STOP_ID = 2  # the stop id the forced lengths emit (the random model's eos, as in bench/sampler.py)
WARMUP_BATCH = 1_000_000  # batch index of the throw-away warm-up batches (its own seeds and key)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="rollouts per RL step N·G (prompts N = batch / group)")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt G")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256, help="T: the cap of a rollout's length")
    ap.add_argument("--slots", type=int, default=16, help="decode slots S (both sides)")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=344)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--tied", type=int, default=1, help="tie embeddings (1/0)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--decode-block", type=int, default=0,
                    help="response key block in columns (0: the sampler's default; T: one block, every decode step "
                         "reads the whole cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=8, help="RL steps per run")
    ap.add_argument("--stream-batches", type=int, default=2, help="pool size in prompt batches (rl.stream_batches)")
    ap.add_argument("--staleness", default="1,2", help="comma-separated bounds k (rl.max_staleness), one run each")
    ap.add_argument("--json", metavar="PATH", help="also write the results (totals and per step) as JSON")
    args = ap.parse_args(argv)
    if args.batch % args.group:
        ap.error(f"--batch {args.batch} must be a multiple of --group {args.group}")
    try:
        args.bounds = [int(k) for k in args.staleness.split(",")]
    except ValueError:
        ap.error(f"--staleness {args.staleness!r}: expected comma-separated integers")
    if not args.bounds or min(args.bounds) < 1:
        ap.error(f"--staleness {args.staleness!r}: every bound must be >= 1 (k = 0 is sync)")
    if args.steps < 1 or args.stream_batches < 1:
        ap.error("--steps and --stream-batches must be >= 1")
    return args


def make_batch(args, i: int):
    """Prompt batch ``i``: tokens [N, P], lengths [N] (all P), forced stop lengths [N·G] (log-normal)."""
    import numpy as np

    n, g, p, t = args.batch // args.group, args.group, args.prompt_len, args.new_tokens
    rng = np.random.default_rng([args.seed, i])
    tokens = rng.integers(3, args.vocab, size=(n, p), dtype=np.int32)
    draw = np.random.default_rng([args.seed + 1, i]).normal(np.log(t / 8), 1.0, size=n * g)
    stop_at = np.clip(np.rint(np.exp(draw)), 1, t).astype(np.int32)
    return tokens, np.full((n,), p, np.int32), stop_at


class SyncRun:
    """The peer: batch i sampled by the synchronous slot-refill sampler at step i."""

    def __init__(self, args, sampler, weights, key_of):
        self.args, self.sampler, self.weights, self.key_of = args, sampler, weights, key_of
        self.name, self.k = "sync (slot refill)", 0
        self.steps: list[dict] = []

    def step(self, s: int) -> None:
        import jax
        import numpy as np

        tokens, lengths, stop_at = make_batch(self.args, s - 1)
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.sampler(self.weights, tokens, lengths, self.key_of(s - 1),
                                                 bench_stop_lengths=stop_at))  # fmt: skip
        wall = time.perf_counter() - t0
        steps, useful = int(self.sampler.last_decode_steps), int(np.asarray(out.lengths).sum())
        self.steps.append({"wall_s": wall, "decode_steps": steps, "useful_tokens": useful, "busy": useful,
                           "dropped_groups": 0, "lag_mean": 0.0, "lag_max": 0})  # fmt: skip


class StreamRun:
    """Ours: a StreamPool with bound k over a decoder shared by every k (its programs compile once)."""

    def __init__(self, args, decoder, weights, key_of, k: int, start_key):
        import numpy as np

        from echorl_jax.sampling.stream import StreamPool

        self.args, self.weights, self.key_of, self.k = args, weights, key_of, k
        self.name = f"stream k={k}"
        self.n = args.batch // args.group
        self.pool = StreamPool(decoder, self.n, bound=k)
        self.pool.start(weights.params, start_key)
        self.pool.counters()  # zero the counters' baseline
        self.admitted = 0  # prompt batches admitted so far: batch i samples with key_of(i), as in sync
        self.steps: list[dict] = []
        self.np = np

    def next_prompts(self):
        tokens, lengths, stop_at = make_batch(self.args, self.admitted)
        records = [(self.admitted, j) for j in range(self.n)]
        self.admitted += 1
        return tokens, lengths, records, stop_at

    def step(self, s: int) -> None:
        import jax

        np, pool, v = self.np, self.pool, s - 1
        t0 = time.perf_counter()
        dropped = pool.drop_stale(v)
        _, rollout, version_bt, _ = pool.draw(self.weights.params, v, self.next_prompts, self.key_of, self.admitted)
        jax.block_until_ready((rollout, version_bt))
        wall = time.perf_counter() - t0
        c = pool.counters()
        mask = np.asarray(rollout.response_mask)
        lag = v - np.asarray(version_bt)[mask]
        steps = int(c["sampler/decode_steps"])
        self.steps.append({
            "wall_s": wall, "decode_steps": steps, "useful_tokens": int(np.asarray(rollout.lengths).sum()),
            "busy": round(c["sampler/slot_occupancy"] * steps * pool.dec.s_rows), "dropped_groups": dropped,
            "lag_mean": float(lag.mean()) if lag.size else 0.0, "lag_max": int(lag.max()) if lag.size else 0,
            "carried_rollouts": int(c["stream/carried_rollouts"]), "carried_groups": int(c["stream/carried_groups"]),
        })  # fmt: skip


def warm_up(args, sampler, decoder, weights, key):
    """Compiles and runs every program once on throw-away batches: the sync sampler, and the stream
    decoder's init / admit / advance / status / harvest / refresh / drop."""
    import jax
    import jax.numpy as jnp

    from echorl_jax.sampling.stream import StreamPool

    tokens, lengths, stop_at = make_batch(args, WARMUP_BATCH)
    jax.block_until_ready(sampler(weights, tokens, lengths, key, bench_stop_lengths=stop_at))
    n = args.batch // args.group
    pool = StreamPool(decoder, n, bound=1)
    pool.start(weights.params, key)
    batches = iter(range(WARMUP_BATCH, WARMUP_BATCH + args.stream_batches + 1))

    def prompts():
        tok, ln, st = make_batch(args, next(batches))
        return tok, ln, [None] * n, st

    pool.draw(weights.params, 0, prompts, lambda a: key)
    pool.state = decoder.refresh(weights.params, pool.state)  # what a draw at a new version runs first
    pool.drop_stale(0)
    pool.state = decoder.drop(pool.state, jnp.zeros((decoder.q,), bool))
    pool.counters()
    jax.block_until_ready(pool.state)


def totals(run, slots: int) -> dict:
    xs = run.steps
    steps, useful = sum(x["decode_steps"] for x in xs), sum(x["useful_tokens"] for x in xs)
    wall = sum(x["wall_s"] for x in xs)
    return {
        "decode_steps": steps, "useful_tokens": useful, "busy_tokens": sum(x["busy"] for x in xs),
        "mean_length": useful / (len(xs) * run.args.batch),  # per harvested rollout
        "occupancy": sum(x["busy"] for x in xs) / max(steps * slots, 1),
        "harvested_occupancy": useful / max(steps * slots, 1),
        "decode_steps_per_1k_tokens": 1000 * steps / max(useful, 1),
        "ms_per_decode_step": 1000 * wall / max(steps, 1), "s_per_step": wall / len(xs),
        "dropped_groups": sum(x["dropped_groups"] for x in xs),
        "lag_max": max(x["lag_max"] for x in xs),
        "lag_mean": sum(x["lag_mean"] * x["useful_tokens"] for x in xs) / max(useful, 1),
    }  # fmt: skip


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from echorl_jax.models.config import ModelConfig
    from echorl_jax.models.transformer import Transformer
    from echorl_jax.sampling.config import SamplingConfig
    from echorl_jax.sampling.decode import response_columns
    from echorl_jax.sampling.sampler import make_sampler
    from echorl_jax.sampling.stream import StreamDecoder

    b, g, p, t = args.batch, args.group, args.prompt_len, args.new_tokens
    n = b // g
    mcfg = ModelConfig(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.mlp,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       max_position_embeddings=max(4096, p + t), tie_embeddings=bool(args.tied),
                       param_dtype=args.dtype, compute_dtype=args.dtype)  # fmt: skip
    graphdef, state = nnx.split(Transformer(mcfg, rngs=nnx.Rngs(args.seed)))
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=t, slots=args.slots)
    sampler = make_sampler(graphdef, cfg, group_size=g, stop_ids=(STOP_ID,), pad_id=0,
                           decode_block=args.decode_block or None)
    plan = sampler.prepare(state, p)
    slots, refill = plan.rows(b)
    if not refill:
        raise SystemExit(f"--slots {args.slots} must be below --batch {b} (slot refill)")
    weights = sampler.decode_weights(state)
    decoder = StreamDecoder(sampler, pool=args.stream_batches * n, slots=slots, prompt_len=p)
    base = jax.random.key(args.seed)
    key_of = lambda i: jax.random.fold_in(base, i)  # noqa: E731  batch i's sampling key, both sides

    # What one decode step reads: every parameter, and at most the slots' whole KV cache (prompt + ring).
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(weights.params))
    ring = response_columns(t, sampler.block_size())
    kv_bytes = (2 * args.layers * slots * (p + ring) * args.kv_heads * (args.hidden // args.heads)
                * jnp.dtype(args.dtype).itemsize)  # fmt: skip
    regime = "weight-bound" if param_bytes >= 4 * kv_bytes else "small model (loop overhead and KV reads)"
    lens = np.concatenate([make_batch(args, i)[2] for i in range(args.steps)])
    print(C.machine_line())
    print(f"model: hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} mlp={args.mlp} "
          f"vocab={args.vocab} tied={bool(args.tied)} dtype={args.dtype}; {args.steps} RL steps of {n} prompts x G {g} "
          f"= {b} rollouts, P {p}, T {t}, {slots} slots, key blocks of {sampler.block_size()} columns; stream pool "
          f"{args.stream_batches} x {n} groups")  # fmt: skip
    print(f"regime: {regime}: a decode step reads {param_bytes / 1e6:.1f} MB of parameters and at most "
          f"{kv_bytes / 1e6:.1f} MB of slot KV cache")  # fmt: skip
    print(f"forced lengths of the sync batches (log-normal, median T/8 = {t // 8}, sigma 1, cap T): mean "
          f"{lens.mean():.0f}, median {np.median(lens):.0f}, p90 {np.percentile(lens, 90):.0f}, max {lens.max()}")

    t0 = time.perf_counter()
    warm_up(args, sampler, decoder, weights, jax.random.key(args.seed + 7))
    print(f"compile + warm-up (excluded): {time.perf_counter() - t0:.1f} s")
    runs = [SyncRun(args, sampler, weights, key_of)]
    runs += [StreamRun(args, decoder, weights, key_of, k, jax.random.key(args.seed + 7)) for k in args.bounds]
    for s in range(1, args.steps + 1):  # the runs alternate step by step: contention hits all alike
        for run in runs:
            run.step(s)

    res = {run.name: totals(run, slots) for run in runs}
    sync = res[runs[0].name]
    header = ["run", "decode steps", "useful tokens", "mean len", "occupancy", "steps / 1k tok", "ms / decode step",
              "s / RL step", "harvested tok/s", "dropped groups", "token lag mean/max", "steps/1k vs sync",
              "s/step vs sync"]
    rows = []
    for run in runs:
        r = res[run.name]
        r["ratio_steps_per_1k"] = r["decode_steps_per_1k_tokens"] / sync["decode_steps_per_1k_tokens"]
        r["ratio_s_per_step"] = r["s_per_step"] / sync["s_per_step"]
        rows.append([run.name, r["decode_steps"], r["useful_tokens"], f"{r['mean_length']:.1f}",
                     f"{r['occupancy']:.1%}", f"{r['decode_steps_per_1k_tokens']:.1f}",
                     f"{r['ms_per_decode_step']:.2f}", f"{r['s_per_step']:.3f}",
                     f"{r['useful_tokens'] / (r['s_per_step'] * len(run.steps)):.0f}", r["dropped_groups"],
                     f"{r['lag_mean']:.2f}/{r['lag_max']}", f"{r['ratio_steps_per_1k']:.2f}x",
                     f"{r['ratio_s_per_step']:.2f}x"])  # fmt: skip
    print(f"\n{regime}; {args.steps} RL steps each, compile excluded; occupancy: sync = useful / (steps x S), "
          f"stream = every token drawn / (steps x S)\n")
    print(C.table(header, rows))
    for run in runs[1:]:
        r, last = res[run.name], run.steps[-1]
        print(f"\n{run.name} vs sync: decode steps per 1k harvested tokens {r['decode_steps_per_1k_tokens']:.1f} vs "
              f"{sync['decode_steps_per_1k_tokens']:.1f} ({r['ratio_steps_per_1k']:.2f}x), s per RL step "
              f"{r['s_per_step']:.3f} vs {sync['s_per_step']:.3f} ({r['ratio_s_per_step']:.2f}x); harvested occupancy "
              f"{r['harvested_occupancy']:.1%} vs {sync['harvested_occupancy']:.1%}; carried at the end: "
              f"{last['carried_groups']} live groups, {last['carried_rollouts']} rollouts in slots")  # fmt: skip
    C.write_json(args.json, {
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "machine": C.machine_line(),
        "args": {k: v for k, v in vars(args).items() if k != "json"}, "slots": slots, "regime": regime,
        "param_bytes": param_bytes, "kv_bytes": kv_bytes,
        "runs": {run.name: {**res[run.name], "steps": run.steps} for run in runs},
    })  # fmt: skip
    return res


if __name__ == "__main__":
    main()
