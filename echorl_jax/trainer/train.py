"""The RL loop: prompts -> rollouts -> rewards -> advantages + EchoClips -> Optax updates.

Sampling and learning use the same sharded parameters (``state.params``); no
weights are copied between engines. Per step:

    sample (jit) -> verify (host) -> score (jit) -> K epochs x minibatches of train_step (jit)
    -> metrics -> eval every ``train.eval_every`` -> Orbax checkpoint every ``train.save_every``
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from echorl_jax import config as config_lib, sharding
from echorl_jax.data.formats import DataError
from echorl_jax.rl import offpolicy, update
from echorl_jax.rl.update import TrainState, UpdateBatch
from echorl_jax.trainer import adapters, checkpoint as ckpt_lib, grading, rollout as rollout_lib, run_state
from echorl_jax.trainer.guard import Guard
from echorl_jax.trainer.learner_pass import make_learner_pass
from echorl_jax.trainer.metrics_log import MetricsLog, to_python
from echorl_jax.trainer.setup import Setup, build_setup


class _Preemption:
    """SIGTERM sets a flag; the loop saves and exits at the end of the step."""

    def __init__(self):
        self.requested = False
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None

    def _handle(self, *_):
        self.requested = True

    def sync(self) -> bool:
        """Whether any process got SIGTERM (one all-gather per step when multi-process), so that every
        process saves the same step and exits together."""
        if jax.process_count() > 1:
            self.requested = sharding.any_process(self.requested)
        return self.requested

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def jit_train_step(cfg: config_lib.Config, graphdef, optimizer, temperature: float, state_sh, mesh, frozen_sh=None):
    """The jitted ``train_step(state, batch, frozen)`` with explicit shardings and donated state (plan.py compiles
    this same one); ``frozen``: LoRA's base weights (read only, not donated), None for full fine-tuning."""
    step_fn = update.make_train_step(
        graphdef, optimizer, cfg.objective, cfg.echo, micro_batches=cfg.rl.micro_batches, temperature=temperature,
    )  # fmt: skip
    batch_sh = sharding.batch_sharding(mesh, 2)  # every UpdateBatch field is [B, ...]
    return jax.jit(step_fn, in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, None),
                   donate_argnums=0)  # fmt: skip


def _jit_train_step(s: Setup, state: TrainState):
    """``train_step(state, batch)`` with the setup's frozen base (LoRA) bound."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    frozen_sh = jax.tree.map(lambda x: x.sharding, s.frozen)
    step = jit_train_step(s.cfg, s.graphdef, s.optimizer, s.train_temperature, state_sh, s.mesh, frozen_sh)
    return lambda state, batch: step(state, batch, s.frozen)


def _rollout_metrics(ro, reward_ng, correct_ng, clips, info, rounds, num_expert: int = 0) -> dict[str, Any]:
    """Rollout metrics (every process computes the same from the gathered arrays); with LUFFY
    (``num_expert = k``) reward, accuracy and lengths are the on-policy rows' (what the policy does),
    the expert rows' under ``expert/``."""
    n, g = reward_ng.shape
    zero_std = np.all(reward_ng == reward_ng[:, :1], axis=1)  # of the mixed group: what the advantage sees
    has_clip = sharding.to_host(clips.mask_bt).reshape(n, -1).any(axis=1)
    on_b = ~offpolicy.expert_rows(n * g, g, num_expert)
    all_lengths = sharding.to_host(ro.lengths)
    mask = sharding.to_host(ro.response_mask)[on_b]
    lengths = all_lengths[on_b]
    entropy = sharding.to_host(ro.entropy)[on_b]
    truncated = sharding.to_host(ro.truncated)[on_b]
    if num_expert:
        expert = {"expert/reward_mean": reward_ng[:, g - num_expert :].mean(),
                  "expert/accuracy": correct_ng[:, g - num_expert :].mean(),
                  "expert/len_mean": all_lengths[~on_b].mean()}  # fmt: skip
        reward_ng, correct_ng = reward_ng[:, : g - num_expert], correct_ng[:, : g - num_expert]
    m = {
        "reward/mean": reward_ng.mean(),
        "reward/std": reward_ng.std(),
        "accuracy": correct_ng.mean(),
        "groups/zero_std_frac": zero_std.mean(),
        "response/len_mean": lengths.mean(),
        "response/len_max": lengths.max(),
        "response/clip_ratio": truncated.mean(),
        "entropy/mean": (entropy * mask).sum() / max(mask.sum(), 1),
        # prompts whose only learning signal this step is the echo term
        "echo/only_signal_frac": (zero_std & has_clip).mean(),
        "sample_rounds": rounds,
    }
    m.update({f"echo/{k}": v for k, v in clips.metrics.items()})
    m.update({f"reward_info/{k}": v for k, v in info.items()})
    if num_expert:
        m.update(expert)
    return m


def _run_updates(train_step, state: TrainState, full: UpdateBatch, mesh, rl, *, seed: int, step: int):
    """``rl.epochs`` passes over the rollout rows, each split into ``rl.minibatches`` optimizer steps."""
    rows = full.tokens_bs.shape[0]
    per_mb = rows // rl.minibatches
    metrics: list[dict] = []
    for epoch in range(rl.epochs):
        order = np.arange(rows)
        if rl.epochs * rl.minibatches > 1:
            order = np.random.default_rng([seed, step, epoch]).permutation(rows)
        for m in range(rl.minibatches):
            idx = jnp.asarray(order[m * per_mb : (m + 1) * per_mb])
            mb = sharding.shard_batch(jax.tree.map(lambda x: jnp.take(x, idx, axis=0), full), mesh)
            state, step_metrics = train_step(state, mb)
            metrics.append(step_metrics)
    return state, metrics


def run_eval(s: Setup, params, step: int) -> dict[str, float]:
    if s.eval_pipeline is None:
        return {}
    s.eval_pipeline.set_state(s.eval_initial_state)
    rng = jax.random.fold_in(jax.random.key(s.cfg.train.seed + 1), step)
    return grading.evaluate(
        s.eval_sample, s.policy(params), s.eval_pipeline, s.eval_records, s.verifier, s.tokenizer,
        k=s.cfg.train.eval_samples, rng=rng,
    )  # fmt: skip


def _num_chunks(rl) -> int:
    """Row chunks of the full rollout batch that are one micro-batch each."""
    return rl.minibatches * rl.micro_batches


def _open_run(s: Setup, state: TrainState) -> tuple[int, TrainState, ckpt_lib.Checkpointer]:
    """A fresh run in a clean workdir, or the exact continuation of the run saved there (trainer/run_state.py)."""
    tc = s.cfg.train
    directory = tc.checkpoint_dir or os.path.join(tc.workdir, "checkpoints")
    checkpointer = ckpt_lib.Checkpointer(directory, keep=tc.keep_checkpoints)
    latest = checkpointer.latest_step()
    if not tc.resume or latest is None:
        if tc.checkpoint_dir and latest is not None:  # not ours to move aside (often gs://)
            checkpointer.close()
            raise run_state.ResumeMismatch(
                f"train.resume=false but train.checkpoint_dir={tc.checkpoint_dir!r} holds checkpoints (step "
                f"{latest}); give a new train.checkpoint_dir or delete that one (gcloud storage rm -r DIR)")
        # Process 0 writes the run files, so its answer decides for all (every process takes the same branch).
        old = run_state.existing_run_files(tc.workdir) if jax.process_index() == 0 else []
        if sharding.any_process(bool(old)):  # resume=false, or a run that never saved
            checkpointer.close()
            run_state.move_previous_run(tc.workdir, s.log)
            checkpointer = ckpt_lib.Checkpointer(directory, keep=tc.keep_checkpoints)
        run_state.write_config(tc.workdir, config_lib.to_dict(s.cfg))
        return 0, state, checkpointer
    host = checkpointer.read_host(latest)
    run_state.check_resume(host.get("config"), config_lib.to_dict(s.cfg), tc.workdir, latest)
    if s.base_identity is not None:  # LoRA adapters fit only the base they were trained on
        adapters.check_base(host.get("lora_base"), s.base_identity, tc.workdir, latest)
    try:
        start, state, host = checkpointer.restore(state, latest)
        s.train_pipeline.set_state(host["data"])
    except (ckpt_lib.CheckpointError, DataError) as e:
        raise run_state.ResumeMismatch(run_state.mismatch_message(tc.workdir, latest, str(e))) from None
    s.log(f"resumed from step {start} in {checkpointer.directory}")
    return start, state, checkpointer


def _log_line(step: int, row: dict, last_eval: dict) -> str:
    acc = next((f" held-out {k} {v:.3f}" for k, v in last_eval.items() if k.startswith("avg@") and "/" not in k), "")
    return (f"step {step}: reward {row.get('reward/mean', 0):.3f} accuracy {row.get('accuracy', 0):.3f} "
            f"loss {row.get('loss', 0):.4g} clips {row.get('echo/num_clips', 0):.0f}{acc}")  # fmt: skip


# What build_setup bakes into a Setup (model and warm start, data pipelines, samplers, verifier, optimizer
# and its schedule length, the reference copy): a setup can be reused for a config that differs elsewhere.
SETUP_SECTIONS = ("model", "mesh", "dist", "data", "task", "sampling", "rl", "reward", "optim", "sft")
SETUP_KEYS = ("objective.expert_per_group", "train.steps", "train.eval_temperature", "train.eval_samples")


def setup_for(cfg: config_lib.Config, setup: Setup) -> Setup:
    """``setup`` with ``cfg`` as its config, or a ConfigError naming what the setup was built with instead."""
    if setup.cfg == cfg:
        return setup
    a, b = config_lib.to_dict(setup.cfg), config_lib.to_dict(cfg)
    diff = [f"{sec}: {a[sec]} vs {b[sec]}" for sec in SETUP_SECTIONS if a[sec] != b[sec]]
    for key in SETUP_KEYS:
        sec, name = key.split(".")
        if a[sec][name] != b[sec][name]:
            diff.append(f"{key}: {a[sec][name]!r} vs {b[sec][name]!r}")
    if cfg.echo.enabled and setup.delimiter_ids.size == 0:
        diff.append("echo.enabled: the setup's tokenizer has no token containing a newline")
    if (setup.ref_params is None) != (cfg.objective.kl_coef == 0):
        diff.append(f"objective.kl_coef: {setup.cfg.objective.kl_coef!r} vs {cfg.objective.kl_coef!r} (reference copy)")
    if diff:
        raise config_lib.ConfigError("train(cfg, setup=...): the setup was built from a config that differs where "
                                     "the setup fixed it (setup's vs cfg's):\n  " + "\n  ".join(diff))
    return dataclasses.replace(setup, cfg=cfg)


def train(cfg: config_lib.Config, *, setup: Setup | None = None) -> dict[str, Any]:
    """Runs ``cfg.train.steps`` RL steps (resuming from the workdir if a checkpoint exists).

    ``setup`` (a previous run's ``out["setup"]``) skips building the model, data and samplers again;
    ``cfg`` may differ from the setup's in the objective, echo and run settings (workdir, seed, ...).
    """
    s = build_setup(cfg) if setup is None else setup_for(cfg, setup)
    tc, rl = cfg.train, cfg.rl
    k = cfg.objective.expert_per_group  # LUFFY expert rows per group
    if k and s.experts is None:
        raise ValueError(f"objective.expert_per_group={k} but the setup was built without expert responses")
    start, state, checkpointer = _open_run(s, s.state)
    log = MetricsLog(tc.workdir, resume_step=start)
    train_step = _jit_train_step(s, state)
    forward_logp = None
    if rl.recompute_logp or cfg.objective.kl_coef > 0 or tc.mismatch_every > 0:
        forward_logp = update.make_forward_logp(s.graphdef, cfg.sampling.max_new_tokens, s.train_temperature,
                                                _num_chunks(rl))  # fmt: skip
    forward_ref = forward_logp  # LoRA: the base model's graph (adapters off) on the frozen weights
    if cfg.objective.kl_coef > 0 and s.ref_graphdef is not s.graphdef:
        forward_ref = update.make_forward_logp(s.ref_graphdef, cfg.sampling.max_new_tokens, s.train_temperature,
                                               _num_chunks(rl))  # fmt: skip
    learner_pass = make_learner_pass(cfg, forward_logp)
    score = rollout_lib.make_scorer(cfg.objective, cfg.echo, s.delimiter_ids, cfg.sampling.max_new_tokens)
    schedule = update.make_schedule(cfg.optim, s.total_updates)
    echo_norm = None
    if cfg.echo.enabled and tc.echo_grad_norm_every > 0:
        echo_norm = update.make_echo_grad_norm(s.graphdef, cfg.echo, s.train_temperature, _num_chunks(rl))
    preempt = _Preemption()
    guard = Guard(tc.collapse_guard, s.log)
    base_key = jax.random.key(tc.seed)
    last_eval: dict[str, float] = {}
    if start == 0:
        last_eval = log.write(0, run_eval(s, state.params, 0), kind="eval")
        guard.update(last_eval, "eval")
    bar = s.progress(start, tc.steps)
    step = saved = start
    stopping = False  # SIGTERM on any process (decided together at the end of a step)
    host = {"lora_base": s.base_identity} if s.base_identity is not None else {}
    save = lambda: checkpointer.save(step, state, {"data": s.train_pipeline.get_state(), "config": config_lib.to_dict(cfg),
                                                   **host})  # fmt: skip
    for step in range(start + 1, tc.steps + 1):
        timings: dict[str, float] = {}
        t_step = time.perf_counter()
        key = jax.random.fold_in(base_key, step)
        policy = s.policy(state.params)  # LoRA: adapters + frozen base, decoded as they are (no merged copy)
        got = rollout_lib.collect(
            lambda: next(s.train_pipeline), s.sample, policy, key,
            verifier=s.verifier, tokenizer=s.tokenizer, group_size=rl.group_size,
            dynamic_sampling=cfg.objective.dynamic_sampling,
            echo_threshold=cfg.echo.success_threshold if cfg.echo.enabled else None,
            max_rounds=rl.max_sample_rounds, timings=timings, records=s.train_records,
            add_experts=s.experts.add_to if s.experts is not None else None,
        )  # fmt: skip
        ro = got.rollout
        t0 = time.perf_counter()
        reward_dev, adv_bt, clips = score(ro, jnp.asarray(got.reward_ng))  # reward_ng: every process's rows
        expert_b = jnp.asarray(offpolicy.expert_rows(ro.tokens.shape[0], rl.group_size, k))
        learner = learner_pass(step, policy, ro, ~expert_b)  # old log-probs, mismatch, rollout correction
        old_logp = learner.old_logp_bt
        if cfg.objective.kl_coef > 0:
            ref_logp = forward_ref(s.ref_params, ro.tokens, ro.valid)
        else:
            ref_logp = jnp.zeros_like(old_logp)
        full = UpdateBatch(ro.tokens, ro.valid, learner.mask_bt, adv_bt, old_logp, ref_logp, clips.mask_bt,
                           ro.response_mask & expert_b[:, None], learner.rc_weight_bt)  # fmt: skip
        extra = dict(learner.metrics)
        if echo_norm is not None and step % tc.echo_grad_norm_every == 0:
            extra["echo/grad_norm"] = echo_norm(state.params, sharding.shard_batch(full, s.mesh), s.frozen)
        state, update_metrics = _run_updates(train_step, state, full, s.mesh, rl, seed=tc.seed, step=step)
        jax.block_until_ready(state.params)
        timings["update"] = time.perf_counter() - t0
        metrics = _rollout_metrics(ro, sharding.to_host(reward_dev), got.correct_ng, clips, got.info, got.rounds, k)
        metrics.update({k: np.mean([float(u[k]) for u in update_metrics]) for k in update_metrics[0]})
        metrics.update(extra)
        metrics["lr"] = float(schedule(int(state.step) - 1))
        step_time = time.perf_counter() - t_step
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        metrics["time/step"] = step_time
        # Every generated token over the time of every sampling round (DAPO may draw several).
        metrics["tokens_per_s"] = got.sampled_tokens / max(timings.get("sample", 0.0), 1e-9)
        if step % tc.log_every == 0 or step == tc.steps:
            row = log.write(step, metrics)
            if not bar.enabled:
                s.log(_log_line(step, row, last_eval))
        else:
            row = to_python(metrics)
        collapsed = guard.update(row)
        if tc.eval_every > 0 and step % tc.eval_every == 0 and step != tc.steps:
            last_eval = log.write(step, run_eval(s, state.params, step), kind="eval")
            collapsed |= guard.update(last_eval, "eval")
        bar.update(row, last_eval)
        stopping = preempt.sync()
        if stopping or collapsed or (tc.save_every > 0 and step % tc.save_every == 0):
            save()
            saved = step
        if stopping or collapsed:
            s.log(f"{'SIGTERM' if stopping else 'collapse guard'}: saved step {step}, exiting")
            break
    stopped = stopping or (bool(guard.fired) and tc.collapse_guard == "stop")
    if not stopped:
        # Also after a resume at the last step (a run preempted there never evaluated it).
        if not log.has(tc.steps, "eval"):
            last_eval = log.write(tc.steps, run_eval(s, state.params, tc.steps), kind="eval")
        elif start == tc.steps:
            last_eval = log.last("eval")
        if step != saved:
            save()
    checkpointer.close()
    bar.close()
    preempt.restore()
    log.close()
    s.state = state
    if tc.export_hf and not stopped:  # every host joins the gather; process 0 writes
        if s.frozen is not None:  # LoRA: the adapters in PEFT's format; the merged model on request
            s.export_adapter(os.path.join(tc.workdir, "peft_adapter"))
        if s.frozen is None or cfg.model.lora.export_merged:
            s.export(os.path.join(tc.workdir, "hf_export"))
    return {"step": step, "eval": last_eval, "workdir": tc.workdir, "setup": s}
