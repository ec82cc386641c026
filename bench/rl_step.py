"""One full RL step by phase (sample / reward / update), EchoRL off vs on, in the same process.

Peer: the same step with ``echo.enabled=False``. Both modes are built from the
built-in task config (``configs/default.py``) with the warm start off
(``sft.steps=0``, random init) and no held-out evaluation; everything else is
the default job (GRPO, N prompts x G rollouts; the sizes are printed).

A random-init policy never solves the task, so no group would be all-success,
no EchoClip would exist and the echo path would cost nothing. To time the echo
path at full load, the verifier still parses every response (the real
``arith`` verifier runs) but then reports reward 1 for every response: every
group is all-success, every group gets an EchoClip, and the echo loss is active
on every group. (With all rewards equal the GRPO advantages are zero; the
update still does the same forward + backward + AdamW either way.)

The step mirrors ``train.train``'s rollout source and learning step piece by piece
(``rollout.collect``, ``rollout.make_scorer``, ``learn_step.setup_train_step``,
``learn_step.run_updates``, the metrics); phases: ``sample`` (jitted generation),
``reward`` (decode + verify on the host), ``update`` (score + train_step: the trainer's
source dispatches scoring asynchronously, so its device time falls in ``time/update``; its
``score`` part — advantages + EchoClips — is also shown alone, timed with one extra
sync), ``metrics`` (host-side metric reduction). The two modes alternate step
by step (order flipped every step) so contention hits both alike; the first
``--warmup`` steps (compilation) are dropped and medians reported.

A second table times the jitted update alone: both modes' ``train_step`` on the
same rollout batch (with its EchoClips), ``--update-reps`` calls each,
interleaved -- the only place where EchoRL adds arithmetic.

    python bench/rl_step.py                # ~2-4 minutes on a 2-core CPU
    python bench/rl_step.py --via-train    # instead: train.train() per mode, read workdir/metrics.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(C.REPO, "configs", "default.py"))
    ap.add_argument("--steps", type=int, default=10, help="timed RL steps per mode")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps per mode (compilation)")
    ap.add_argument("--update-reps", type=int, default=20, help="train_step calls per mode in the update-only table")
    ap.add_argument("--real-rewards", action="store_true",
                    help="keep the task's rewards (random init: no all-success group, no clips)")
    ap.add_argument("--via-train", action="store_true",
                    help="run train.train() once per mode (sequentially) and read time/* from metrics.jsonl")
    return ap.parse_args(argv)


def all_correct(verifier):
    """The task verifier (so the reward phase does its real parsing work), then reward 1 for everything."""
    import numpy as np

    from echorl_jax.rewards import call_verifier
    from echorl_jax.rewards.base import RewardResult

    def verify(responses, ground_truths, rows):
        real = call_verifier(verifier, responses, ground_truths, rows)
        n = len(responses)
        return RewardResult(np.ones(n, np.float32), np.ones(n, bool), dict(real.info))

    verify.takes_rows = True  # rows reach the router, which picks the verifier by data_source
    return verify


def make_cfg(args, echo: bool, workdir: str, steps: int):
    from echorl_jax import config as config_lib

    overrides = {
        "sft": {"steps": 0},
        "data": {"eval": ""},
        "rl": {"pack_rows_per_micro_batch": 0},  # padded rows, as measured in bench/README.md (bench/packing.py: packed)
        "echo": {"enabled": echo},
        "train": {"steps": steps, "workdir": workdir, "progress": False, "export_hf": False, "resume": False,
                  "eval_every": 0},
    }  # fmt: skip
    return config_lib.build_config(config_lib.load_config_file(args.config), overrides)


class Mode:
    """One configuration (echo on or off) and the pieces of train.train's loop body."""

    def __init__(self, args, echo: bool, workdir: str):
        import jax

        from echorl_jax.rl import update
        from echorl_jax.trainer import learn_step, rollout as rollout_lib, setup as setup_lib

        self.name = "echo on" if echo else "echo off"
        self.cfg = cfg = make_cfg(args, echo, workdir, args.warmup + args.steps)
        self.s = s = setup_lib.build_setup(cfg, log=lambda msg: None)
        if not args.real_rewards:
            s.verifier = all_correct(s.verifier)
        self.state = s.state
        self.train_step = learn_step.setup_train_step(s, self.state)
        self.score = rollout_lib.make_scorer(cfg.objective, cfg.echo, s.delimiter_ids, cfg.sampling.max_new_tokens)
        self.schedule = update.make_schedule(cfg.optim, s.total_updates)
        self.base_key = jax.random.key(cfg.train.seed)
        self.times: dict[str, list[float]] = {}
        self.clips: list[float] = []
        self.clip_len: list[float] = []
        self.last_batch = None

    def step(self, step: int, record: bool) -> None:
        """``train.train``'s loop body for one step (no eval, no checkpoint), timed by phase."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        from echorl_jax.rl.update import UpdateBatch
        from echorl_jax.trainer import learn_step, rollout as rollout_lib, rollout_source

        s, cfg, rl = self.s, self.cfg, self.cfg.rl
        timings: dict[str, float] = {}
        t_step = time.perf_counter()
        key = jax.random.fold_in(self.base_key, step)
        ro, reward_ng, correct_ng, info, rounds, *_ = rollout_lib.collect(
            lambda: next(s.train_pipeline), s.sample, s.decode_weights(s.sample, self.state.params), key,
            verifier=s.verifier, tokenizer=s.tokenizer, group_size=rl.group_size,
            dynamic_sampling=cfg.objective.dynamic_sampling,
            echo_threshold=cfg.echo.success_threshold if cfg.echo.enabled else None,
            max_rounds=rl.max_sample_rounds, timings=timings, records=s.train_records,
        )  # fmt: skip
        t0 = time.perf_counter()
        reward_dev, adv_bt, clips = self.score(ro, jnp.asarray(reward_ng))
        jax.block_until_ready(clips.mask_bt)  # the one sync the trainer does not do: times score on its own
        timings["score"] = time.perf_counter() - t0
        old_logp = ro.behaviour_logp  # rl.recompute_logp=False and kl_coef=0 in the default job
        full = UpdateBatch(ro.tokens, ro.valid, ro.response_mask, adv_bt, old_logp, jnp.zeros_like(old_logp),
                           clips.mask_bt)  # fmt: skip
        # The trainer's own minibatch loop, so the bench times exactly what the learning step runs.
        self.state, update_metrics = learn_step.run_updates(self.train_step, self.state, full, s.mesh, rl,
                                                            seed=cfg.train.seed, step=step)  # fmt: skip
        jax.block_until_ready(self.state.params)
        timings["update"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = rollout_source.rollout_metrics(ro, np.asarray(reward_dev), correct_ng, clips, info, rounds)
        metrics.update({k: np.mean([float(u[k]) for u in update_metrics]) for k in update_metrics[0]})
        metrics["lr"] = float(self.schedule(int(self.state.step) - 1))
        timings["metrics"] = time.perf_counter() - t1
        timings["step"] = time.perf_counter() - t_step
        self.last_batch = full
        if record:
            for k, v in timings.items():
                self.times.setdefault(k, []).append(v)
            self.clips.append(float(metrics["echo/num_clips"]))
            self.clip_len.append(float(metrics["echo/mean_clip_len"]))
            if "echo_loss" in metrics:
                self.echo_loss = float(metrics["echo_loss"])

    def cost(self, batch) -> dict:
        """XLA's static cost analysis of this mode's compiled train_step (flops, bytes accessed): noise-free."""
        from echorl_jax import sharding

        mb = sharding.shard_batch(batch, self.s.mesh)
        ca = self.train_step.lower(self.state, mb).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return {k: float(ca.get(k, float("nan"))) for k in ("flops", "bytes accessed")}

    def update_only(self, batch, reps: int) -> list[float]:
        import jax

        from echorl_jax import sharding

        mb = sharding.shard_batch(batch, self.s.mesh)
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            self.state, _ = self.train_step(self.state, mb)
            jax.block_until_ready(self.state.params)
            out.append(time.perf_counter() - t0)
        return out


PHASES = [("sample", "sample"), ("reward", "reward"), ("update", "update (score + train_step)"),
          ("score", "  of which score (adv + EchoClips)"), ("metrics", "metrics (host)"), ("step", "whole step")]  # fmt: skip


def phase_table(off: dict, on: dict) -> str:
    rows = []
    for key, label in PHASES:
        if key not in off or key not in on:
            continue
        a, b = C.median(off[key]), C.median(on[key])
        rows.append([label, f"{a:.4f}", f"{b:.4f}", f"{b / a:.3f}", f"{(b - a) * 1e3:+.1f}"])
    return C.table(["phase", "echo off s (median)", "echo on s (median)", "on / off", "on - off ms"], rows)


def via_train(args, tmp: str) -> None:
    """Runs train.train once per mode and reads the per-phase timings the trainer itself logs."""
    from echorl_jax.trainer import setup as setup_lib, train
    from echorl_jax.trainer.metrics_log import read_jsonl

    results = {}
    for echo in (False, True):
        workdir = os.path.join(tmp, f"echo_{int(echo)}")
        cfg = make_cfg(args, echo, workdir, args.warmup + args.steps)
        s = setup_lib.build_setup(cfg, log=lambda msg: None)
        if not args.real_rewards:
            s.verifier = all_correct(s.verifier)
        train.train(cfg, setup=s)
        rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("kind") == "train"]
        rows = [r for r in rows if r["step"] > args.warmup]
        results[echo] = {k: [r[f"time/{k}"] for r in rows] for k in ("sample", "reward", "update", "step")}
        results[echo]["clips"] = [r.get("echo/num_clips", 0.0) for r in rows]
    print(f"\ntrain.train per mode, sequential; {args.steps} steps after {args.warmup} dropped; "
          f"time/* from metrics.jsonl, medians")  # fmt: skip
    print(phase_table(results[False], results[True]))
    print(f"clips per step (echo on): {C.median(results[True]['clips']):.0f}")


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np

    print(C.machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        if args.via_train:
            return via_train(args, tmp)
        off, on = Mode(args, False, os.path.join(tmp, "off")), Mode(args, True, os.path.join(tmp, "on"))
        cfg, s = on.cfg, on.s
        n_params = sum(x.size for x in jax.tree.leaves(s.state.params))
        print(f"config: {os.path.relpath(args.config, C.REPO)} with sft.steps=0, no eval; model {cfg.model.model_type} "
              f"hidden={cfg.model.hidden_size} layers={cfg.model.num_layers} vocab={cfg.model.vocab_size} "
              f"({n_params / 1e6:.2f}M params); {cfg.rl.prompts_per_step} prompts x {cfg.rl.group_size} rollouts, "
              f"prompt {cfg.data.max_prompt_len} + response {cfg.sampling.max_new_tokens} tokens; "
              f"{cfg.objective.method}, echo coef {cfg.echo.coef}; rewards: "
              f"{'the task verifier' if args.real_rewards else 'all-correct (task verifier runs, reward forced to 1)'}")  # fmt: skip
        for i in range(1, args.warmup + args.steps + 1):
            for mode in (off, on) if i % 2 else (on, off):
                mode.step(i, record=i > args.warmup)
        print(f"\n{args.steps} RL steps per mode after {args.warmup} dropped (compilation); modes alternate every step")
        print(phase_table(off.times, on.times))
        a, b = C.median(off.times["step"]), C.median(on.times["step"])
        print(f"\nEchoRL overhead on the whole step: {(b / a - 1) * 100:+.2f} % (target < 1 %); "
              f"clips per step: echo on {C.median(on.clips):.0f} (mean length {C.median(on.clip_len):.1f} tokens), "
              f"echo off {C.median(off.clips):.0f} (computed by the scorer, unused by the loss)")  # fmt: skip

        # Update alone: the same batch with clips through both train steps.
        batch = on.last_batch
        t_off, t_on = [], []
        for r in range(4):
            reps = max(args.update_reps // 4, 1)
            for mode, acc in ((off, t_off), (on, t_on)) if r % 2 == 0 else ((on, t_on), (off, t_off)):
                acc += mode.update_only(batch, reps)
        n_clip = int(np.asarray(batch.echo_mask_bt).any(axis=1).sum())
        ma, mb = C.median(t_off), C.median(t_on)
        print(f"\njitted train_step alone, same rollout batch ({n_clip} EchoClips), {len(t_off)} calls per mode, "
              f"interleaved")  # fmt: skip
        print(C.table(["train_step", "s/call (median)", "min-max s"],
                      [["echo off", f"{ma:.4f}", C.spread(t_off)], ["echo on", f"{mb:.4f}", C.spread(t_on)]]))  # fmt: skip
        print(f"echo on / off: {mb / ma:.3f} ({(mb / ma - 1) * 100:+.2f} %)")
        c_off, c_on = off.cost(batch), on.cost(batch)
        print("\nXLA cost analysis of the compiled train_step (static, no timing noise):")
        print(C.table(["train_step", "GFLOP", "GB accessed"],
                      [["echo off", f"{c_off['flops'] / 1e9:.3f}", f"{c_off['bytes accessed'] / 1e9:.3f}"],
                       ["echo on", f"{c_on['flops'] / 1e9:.3f}", f"{c_on['bytes accessed'] / 1e9:.3f}"],
                       ["on / off", f"{c_on['flops'] / c_off['flops']:.5f}",
                        f"{c_on['bytes accessed'] / c_off['bytes accessed']:.5f}"]]))  # fmt: skip
        if jax.default_backend() == "cpu":
            print("CPU timings: cores are shared with other jobs; differences under a few % are within the noise.")


if __name__ == "__main__":
    main()
