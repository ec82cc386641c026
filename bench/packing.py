"""Packed vs padded learner batches on long-tailed response lengths: the train step, then the full RL step.

Peer: today's padded path -- one ``[P + T]`` row per rollout, the mini-batch split into
micro-batches of ``k`` rows per device (``rl.micro_batches``). Ours: the same rows packed
(``rl.pack_rows_per_micro_batch = k``: micro-batches of ``k`` packed rows per device,
so both hold the same activations per micro-batch), empty micro-batches skipped. Both are
``update.make_train_step`` jitted as the trainer does (``learn_step.jit_train_step``: explicit
shardings, donated state), default GRPO + EchoRL loss, AdamW.

Workload: ``--rows`` rollouts (groups of ``--group``), prompts of ``P/2..P`` tokens, responses
drawn from a log-normal with median ``T/5`` (sigma 1) capped at ``T`` -- RL's long tail. Reported
per step: wall time (median of ``--reps``, the two sides interleaved), useful tokens/s (real
prompt + response tokens per second), micro-batches computed and their fill (real tokens /
tokens computed), and the ratio ours / peer.

``--rl-step`` adds the full RL step on the same lengths: the jitted sampler (``make_sampler``,
its bench-only ``bench_stop_lengths`` hook forces each rollout's length; ``--slots`` for slot
refill) followed by the update on its rollouts, padded vs packed. The sampler is the same code
either way; the step ratio shows what packing saves of a whole step.

``--preset default-job``: ``configs/default.py``'s model and batch (128 rollouts of 16 + 48 tokens,
one device) with its rollouts' lengths (responses ~30 tokens after the warm start); with
``--peer-micro-batches 1`` the peer is the default job's padded step as shipped.

    python bench/packing.py                  # CPU, ~2 minutes
    python bench/packing.py --rl-step        # + sample + update (a few more minutes)
    python bench/packing.py --preset default-job --peer-micro-batches 1
    python bench/packing.py --attention xla_chunked --response 1024 --rows 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C

STOP_ID = 2
PRESETS = {
    "default-job": dict(rows=128, group=8, prompt=16, response=48, hidden=128, layers=4, heads=4, kv_heads=2, mlp=344,
                        vocab=128, workload="default-job"),
    # bench/train_step.py's preset model and batch (16 rows of P 256 + T 768, bf16), the lengths long-tailed.
    "qwen2.5-0.5b": dict(rows=16, group=8, prompt=256, response=768, rows_per_micro_batch=4, model_type="qwen2",
                         hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vocab=151936, dtype="bfloat16",
                         param_dtype="bfloat16"),
}  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64, help="rollouts per step (N x G)")
    ap.add_argument("--group", type=int, default=8, help="G rollouts per prompt")
    ap.add_argument("--prompt", type=int, default=16, help="P: prompt columns (prompts have P/2..P tokens)")
    ap.add_argument("--response", type=int, default=240, help="T: response columns")
    ap.add_argument("--rows-per-micro-batch", type=int, default=4,
                    help="k: rows per device per micro-batch, padded and packed alike")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the response lengths")
    ap.add_argument("--workload", choices=("longtail", "default-job"), default="longtail",
                    help="default-job: the lengths of configs/default.py's rollouts after its warm start "
                         "(responses ~N(30, 6) tokens, 12..T; prompts P/2..P) -- see --preset default-job")
    ap.add_argument("--peer-micro-batches", type=int, default=0,
                    help="the padded side's rl.micro_batches (0: rows per device / k, the packed side's shape)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default-job: configs/default.py's model and batch (128 rollouts of 16 + 48 tokens); "
                         "qwen2.5-0.5b: bench/train_step.py's preset model and batch (16 rows of 256 + 768, bf16)")
    ap.add_argument("--model-type", choices=("llama", "qwen2"), default="llama",
                    help="llama: no attention bias; qwen2: q/k/v bias")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--mlp", type=int, default=344)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--attention", choices=("auto", "xla", "xla_chunked", "cudnn", "splash"), default="auto")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    ap.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32", help="parameter dtype")
    ap.add_argument("--remat", choices=("none", "full", "dots", "attn", "dots_attn"), default="none",
                    help="activation checkpointing (models/transformer.REMAT_POLICIES), both sides")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per side")
    ap.add_argument("--rl-step", action="store_true", help="also time sample + update per side")
    ap.add_argument("--slots", type=int, default=0, help="--rl-step: decode slots with refill (0: one row per rollout)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    C.apply_preset(args, argv, PRESETS)
    return args


def workload(args, rng):
    """Per-rollout prompt and response lengths (host)."""
    import numpy as np

    b, p, t = args.rows, args.prompt, args.response
    plen = rng.integers(max(1, p // 2), p + 1, b)
    if args.workload == "default-job":  # measured: response/len_mean 28-32, len_max 41-46 over 12 steps
        return plen, np.clip(np.rint(rng.normal(30, 6, b)), 12, t).astype(np.int64)
    rlen = np.clip(np.rint(np.exp(rng.normal(np.log(t / 5), args.sigma, b))), 1, t).astype(np.int64)
    return plen, rlen


def update_batch(args, rng, plen, rlen, tokens=None):
    """An UpdateBatch of left-padded rows with the given lengths (random tokens unless given)."""
    import numpy as np

    from echorl_jax.rl.update import UpdateBatch

    b, p, t = args.rows, args.prompt, args.response
    if tokens is None:
        tokens = rng.integers(3, args.vocab, (b, p + t)).astype(np.int32)
    valid = np.zeros((b, p + t), bool)
    for i in range(b):
        valid[i, p - plen[i] : p + rlen[i]] = True
    mask = valid[:, p:].copy()
    adv = np.where(mask, np.repeat(rng.standard_normal(b // args.group), args.group)[:, None], 0).astype(np.float32)
    old = np.where(mask, -np.log(args.vocab) + 0.1 * rng.standard_normal((b, t)), 0).astype(np.float32)
    echo = np.zeros((b, t), bool)
    echo[:: args.group] = np.arange(t)[None, :] < (rlen[:: args.group, None] // 3 + 1)
    return UpdateBatch(tokens, valid, mask, adv, old, np.zeros((b, t), np.float32), echo & mask,
                       np.zeros((b, t), bool))  # fmt: skip


def build(args):
    """Model, mesh, optimizer and the two jitted steps (padded, packed), as the trainer builds them."""
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    from echorl_jax import config as config_lib, sharding
    from echorl_jax.models.transformer import Transformer
    from echorl_jax.rl import update
    from echorl_jax.trainer import learn_step, setup as setup_lib

    mesh = sharding.make_mesh((-1, 1, 1))
    d = sharding.batch_divisor(mesh)
    per_device = args.rows // d
    k = args.rows_per_micro_batch
    if args.rows % d or per_device % k:
        raise SystemExit(f"--rows {args.rows} must split into {d} devices x a multiple of k={k}")
    base = {
        "model": {"model_type": args.model_type, "attention_bias": args.model_type == "qwen2", "tie_embeddings": True,
                  "vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.mlp,
                  "num_layers": args.layers, "num_heads": args.heads, "num_kv_heads": args.kv_heads,
                  "attention": args.attention, "compute_dtype": args.dtype, "param_dtype": args.param_dtype,
                  "remat": args.remat},
        "data": {"max_prompt_len": args.prompt},
        "sampling": {"max_new_tokens": args.response, "slots": args.slots},
        "objective": {"method": "grpo"}, "echo": {"enabled": True},
        "rl": {"prompts_per_step": args.rows // args.group, "group_size": args.group},
    }  # fmt: skip
    padded = config_lib.build_config(base, {"rl": {"micro_batches": args.peer_micro_batches or per_device // k}})
    packed = config_lib.build_config(base, {"rl": {"pack_rows_per_micro_batch": k}})
    model = sharding.shard_model(Transformer(setup_lib.model_config(padded), rngs=nnx.Rngs(args.seed)), mesh)
    graphdef, params = nnx.split(model)
    optimizer = update.make_optimizer(padded.optim, 1000)
    state = update.TrainState(jax.device_put(np.int32(0), sharding.replicated(mesh)), params,
                              update.init_opt_state(optimizer, params, mesh))  # fmt: skip
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    steps = {name: learn_step.jit_train_step(cfg, graphdef, optimizer, 1.0, state_sh, mesh)
             for name, cfg in (("padded", padded), ("packed", packed))}  # fmt: skip
    spec = learn_step.pack_spec(packed, args.rows, mesh)
    return dataclasses.make_dataclass("Built", ["mesh", "graphdef", "state", "steps", "spec", "cfg", "model"])(
        mesh, graphdef, state, steps, spec, padded, model)


def run_update(built, name, state, batch_dev, lengths):
    """One optimizer step of side ``name``; returns the new state (blocked on)."""
    import jax

    from echorl_jax.rl import packing

    if name == "padded":
        state, _ = built.steps["padded"](state, batch_dev)
    else:
        dest = packing.plan_rows(lengths, built.spec)
        state, _ = built.steps["packed"](state, batch_dev, packing.put_plan(dest, built.mesh))
    return jax.block_until_ready(state)


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np

    from echorl_jax import sharding
    from echorl_jax.rl import packing

    rng = np.random.default_rng(args.seed)
    plen, rlen = workload(args, rng)
    lengths = plen + rlen
    built = build(args)
    spec, s = built.spec, args.prompt + args.response
    dest = packing.plan_rows(lengths, spec)
    used = packing.micro_batches_used(dest, spec)
    d = sharding.batch_divisor(built.mesh)
    print(C.machine_line())
    print(f"model: {args.model_type}, hidden {args.hidden}, {args.layers} layers, heads {args.heads}/{args.kv_heads}, "
          f"mlp {args.mlp}, vocab {args.vocab}, attention {built.model.attention_impl}, compute {args.dtype}, params "
          f"{args.param_dtype}, remat {args.remat}; {args.rows} rollouts "
          f"of P {args.prompt} + T {args.response} on {d} device(s); padded: {built.cfg.rl.micro_batches} "
          f"micro-batch(es) of {args.rows // d // built.cfg.rl.micro_batches} rows per device; packed: "
          f"{spec.rows_per_device} rows of {spec.row_len} per device per micro-batch, up to {spec.num_micro_batches}")  # fmt: skip
    dist = ("default job's" if args.workload == "default-job" else
            f"log-normal, median T/5 = {args.response // 5}, sigma {args.sigma}, cap T")  # fmt: skip
    print(f"response lengths ({dist}): mean "
          f"{rlen.mean():.0f}, median {np.median(rlen):.0f}, p90 {np.percentile(rlen, 90):.0f}, max {rlen.max()}; "
          f"real tokens {lengths.sum()} of {args.rows * s} padded ({lengths.sum() / (args.rows * s):.1%})")  # fmt: skip

    batch = sharding.shard_batch(update_batch(args, rng, plen, rlen), built.mesh)
    state = built.state
    compile_s = {}
    for name in ("padded", "packed"):  # compile + warm up
        t0 = time.perf_counter()
        state = run_update(built, name, state, batch, lengths)
        compile_s[name] = time.perf_counter() - t0
    times = {"padded": [], "packed": []}
    for rep in range(args.reps):
        for name in (("padded", "packed") if rep % 2 == 0 else ("packed", "padded")):
            t0 = time.perf_counter()
            state = run_update(built, name, state, batch, lengths)
            times[name].append(time.perf_counter() - t0)
    pad_mb, tok = built.cfg.rl.micro_batches, int(lengths.sum())
    rows, report = [], {}
    for name, mbs in (("padded (peer)", pad_mb), ("packed (ours)", used)):
        sec = C.median(times[name.split()[0]])
        fill = tok / (mbs * spec.tokens_per_micro_batch if name.startswith("packed") else args.rows * s)
        rows.append([name, f"{sec:.3f}", C.spread(times[name.split()[0]]), f"{tok / sec:,.0f}", f"{mbs}", f"{fill:.1%}",
                     f"{compile_s[name.split()[0]]:.1f}"])  # fmt: skip
        report[name.split()[0]] = {"s_per_step": sec, "min_s": min(times[name.split()[0]]),
                                   "max_s": max(times[name.split()[0]]), "useful_tokens_per_s": tok / sec,
                                   "micro_batches": int(mbs), "fill": fill,
                                   "first_call_s": compile_s[name.split()[0]]}  # fmt: skip
    ratio = C.median(times["padded"]) / C.median(times["packed"])
    print("\ntrain step (forward + backward + AdamW), one optimizer step over all rollouts:\n")
    print(C.table(["side", "s/step", "min-max", "useful tok/s", "micro-batches", "fill", "first call s"], rows))
    print(f"\npacked / padded useful tokens/s: {ratio:.2f}x "
          f"(compiled programs: padded {built.steps['padded']._cache_size()}, "
          f"packed {built.steps['packed']._cache_size()})")  # fmt: skip
    result = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
              "attention": built.model.attention_impl, "remat": args.remat, "dtype": args.dtype,
              "param_dtype": args.param_dtype, "rows": args.rows, "prompt": args.prompt, "response": args.response,
              "rows_per_micro_batch": args.rows_per_micro_batch, "real_tokens": tok, "padded_tokens": args.rows * s,
              "response_lengths": {"mean": float(rlen.mean()), "median": float(np.median(rlen)), "max": int(rlen.max())},
              **report, "ratio_packed_over_padded": ratio,
              "compiled_programs": {k: built.steps[k]._cache_size() for k in ("padded", "packed")}}  # fmt: skip
    C.write_json(args.json, result)
    if args.rl_step:
        result["rl_step"] = rl_step(args, built, state, rng, plen, rlen)
        C.write_json(args.json, result)


def rl_step(args, built, state, rng, plen, rlen):
    """Sample (forced long-tail lengths) + update, per side; the sampler is shared."""
    import jax
    import numpy as np

    from echorl_jax import sharding
    from echorl_jax.sampling.sampler import make_sampler

    g, n = args.group, args.rows // args.group
    sample = make_sampler(built.graphdef, built.cfg.sampling, group_size=g, stop_ids=(STOP_ID,), pad_id=0,
                          mesh=built.mesh)  # fmt: skip
    # One prompt length per group (a prompt's G rollouts share it).
    plen_n = plen[::g]
    prompts = np.zeros((n, args.prompt), np.int32)
    for i in range(n):
        prompts[i, args.prompt - plen_n[i] :] = rng.integers(3, args.vocab, plen_n[i])
    times = {"padded": [], "packed": []}
    phases = {"padded": [], "packed": []}
    for rep in range(args.reps + 1):
        for name in (("padded", "packed") if rep % 2 == 0 else ("packed", "padded")):
            t0 = time.perf_counter()
            ro = jax.block_until_ready(sample(state.params, prompts, plen_n, jax.random.key(rep),
                                              bench_stop_lengths=rlen.astype(np.int32)))  # fmt: skip
            t1 = time.perf_counter()
            got_rlen = np.asarray(ro.lengths)
            tokens = np.asarray(sharding.to_host(ro.tokens))
            batch = update_batch(args, rng, np.repeat(plen_n, g), got_rlen, tokens)
            batch = sharding.shard_batch(batch, built.mesh)
            state = run_update(built, name, state, batch, np.repeat(plen_n, g) + got_rlen)
            t2 = time.perf_counter()
            if rep:  # rep 0 compiles
                times[name].append(t2 - t0)
                phases[name].append((t1 - t0, t2 - t1))
    rows = []
    for name in ("padded", "packed"):
        sample_s = C.median([a for a, _ in phases[name]])
        update_s = C.median([b for _, b in phases[name]])
        rows.append([f"{name} ({'peer' if name == 'padded' else 'ours'})", f"{C.median(times[name]):.3f}",
                     f"{sample_s:.3f}", f"{update_s:.3f}"])  # fmt: skip
    print(f"\nfull RL step (sample with {'slot refill, ' + str(args.slots) + ' slots' if args.slots else 'one row per rollout'}"
          f" + host batch + update), same lengths:\n")  # fmt: skip
    print(C.table(["side", "s/step", "sample s", "update s"], rows))
    print(f"\npacked / padded RL steps/s: {C.median(times['padded']) / C.median(times['packed']):.2f}x")
    return {name: {"s_per_step": C.median(times[name]), "sample_s": C.median([a for a, _ in phases[name]]),
                   "update_s": C.median([b for _, b in phases[name]])} for name in ("padded", "packed")}  # fmt: skip


if __name__ == "__main__":
    main()
