"""The RL loop: prompts -> rollouts -> rewards -> advantages + EchoClips -> Optax updates.

Sampling and learning use the same parameters: once per step the sampler gets a copy of
``state.params`` in the compute dtype, laid out for decoding (sampling/layout.py), dropped after
sampling; there is no second engine. Per step:

    sample (jit) -> verify (host) -> score (jit) -> K epochs x minibatches of train_step (jit)
    -> metrics -> eval every ``train.eval_every`` -> Orbax checkpoint every ``train.save_every``
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from echorl_jax import config as config_lib, sharding
from echorl_jax.data.formats import DataError
from echorl_jax.rl import offpolicy, packing, update
from echorl_jax.rl.update import TrainState, UpdateBatch
from echorl_jax.trainer import adapters, checkpoint as ckpt_lib, grading, rollout as rollout_lib, run_state, storage
from echorl_jax.trainer.guard import Guard, NonFinite
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


def pack_spec(cfg: config_lib.Config, num_rows: int, mesh) -> packing.PackSpec | None:
    """The packed layout of a pass over ``num_rows`` rollout rows; None without packing."""
    if not cfg.rl.pack_rows_per_micro_batch:
        return None
    p, t = cfg.data.max_prompt_len, cfg.sampling.max_new_tokens
    return packing.make_spec(num_rows, p + t, t, cfg.rl.pack_rows_per_micro_batch, mesh)


def minibatch_rows(cfg: config_lib.Config) -> int:
    return cfg.rl.prompts_per_step * cfg.rl.group_size // cfg.rl.minibatches


def jit_train_step(cfg: config_lib.Config, graphdef, optimizer, temperature: float, state_sh, mesh, frozen_sh=None):
    """The jitted train step with explicit shardings and donated state (plan.py compiles this same one).
    With packing it takes the mini-batch's plan too: ``step(state, batch, dest_b)``. With LoRA (``frozen_sh``:
    the base weights' shardings) ``step(state, batch, dest_b or None, frozen)``: the base is read, never donated."""
    pack = pack_spec(cfg, minibatch_rows(cfg), mesh)
    step_fn = update.make_train_step(
        graphdef, optimizer, cfg.objective, cfg.echo, micro_batches=cfg.rl.micro_batches, temperature=temperature,
        pack=pack, param_sh=state_sh.params,
    )  # fmt: skip
    batch_sh = sharding.batch_sharding(mesh, 2)  # every UpdateBatch field is [B, ...]
    plan_sh = None if pack is None else sharding.replicated(mesh)
    in_sh = (state_sh, batch_sh) if pack is None else (state_sh, batch_sh, plan_sh)
    if frozen_sh is not None:
        in_sh = (state_sh, batch_sh, plan_sh, frozen_sh)
    return jax.jit(sharding.traced_on(mesh, step_fn), in_shardings=in_sh, out_shardings=(state_sh, None), donate_argnums=0)


def abstract_step_inputs(cfg: config_lib.Config, mesh, rows: int | None = None, frozen=None) -> tuple:
    """A learner pass's batch arguments as abstract values (plan.py): the ``UpdateBatch`` of ``rows``
    rollout rows (default: a mini-batch, the train step's), with packing its plan, and with LoRA (``frozen``:
    the abstract base weights) the plan or None and the base."""
    rows = rows or minibatch_rows(cfg)
    p, t = cfg.data.max_prompt_len, cfg.sampling.max_new_tokens
    sds = lambda cols, dtype: jax.ShapeDtypeStruct((rows, cols), dtype, sharding=sharding.batch_sharding(mesh, 2))  # noqa: E731
    f32 = jnp.float32
    batch = UpdateBatch(sds(p + t, jnp.int32), sds(p + t, bool), sds(t, bool), sds(t, f32), sds(t, f32), sds(t, f32),
                        sds(t, bool), sds(t, bool) if cfg.objective.expert_per_group else None,  # LUFFY expert tokens
                        sds(t, f32) if "token_tis" in cfg.objective.rollout_correction else None)  # fmt: skip
    plan = None if pack_spec(cfg, rows, mesh) is None else packing.abstract_plan(rows, mesh)
    if frozen is not None:
        return batch, plan, frozen
    return (batch,) if plan is None else (batch, plan)


def make_batch_passes(cfg: config_lib.Config, graphdef, temperature: float, mesh, param_sh=None) -> tuple:
    """The learner's passes over the whole rollout batch, as jitted functions (None when the run has no use
    for one): ``forward_logp`` (old / reference log-probs, mismatch metrics) and ``echo_norm`` (the echo
    term's gradient norm, a diagnostic; ``param_sh``: the parameters' shardings, its gradients keep them).
    plan.py compiles these same ones."""
    rl, tc = cfg.rl, cfg.train
    pack_all = pack_spec(cfg, rl.prompts_per_step * rl.group_size, mesh)  # the whole batch's packed layout
    forward_logp = echo_norm = None
    if rl.recompute_logp or cfg.objective.kl_coef > 0 or tc.mismatch_every > 0:
        forward_logp = update.make_forward_logp(graphdef, cfg.sampling.max_new_tokens, temperature, _num_chunks(rl),
                                                pack_all, mesh)  # fmt: skip
    if cfg.echo.enabled and tc.echo_grad_norm_every > 0:
        echo_norm = update.make_echo_grad_norm(graphdef, cfg.echo, temperature, _num_chunks(rl), pack_all, mesh,
                                               param_sh)  # fmt: skip
    return forward_logp, echo_norm


def _jit_train_step(s: Setup, state: TrainState):
    """The run's jitted train step, ``(state, batch[, dest_b])``; LoRA: with the setup's frozen base bound."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    frozen_sh = jax.tree.map(lambda x: x.sharding, s.frozen)
    step = jit_train_step(s.cfg, s.graphdef, s.optimizer, s.train_temperature, state_sh, s.mesh, frozen_sh)
    if s.frozen is None:
        return step
    return lambda state, batch, dest_b=None: step(state, batch, dest_b, s.frozen)


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


def _run_updates(train_step, state: TrainState, full: UpdateBatch, mesh, rl, *, seed: int, step: int,
                 pack: packing.PackSpec | None = None, lengths: np.ndarray | None = None,
                 keep: np.ndarray | None = None):  # fmt: skip
    """``rl.epochs`` passes over the rollout rows, each split into ``rl.minibatches`` optimizer steps.
    With ``pack`` each mini-batch's rows (real-token ``lengths``, host) are packed by a host plan, which
    leaves out the rows ``keep`` marks false (no gradient: ``update.signal_rows``)."""
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
            if pack is None:
                state, step_metrics = train_step(state, mb)
            else:
                mb_lengths = lengths[order[m * per_mb : (m + 1) * per_mb]]
                mb_keep = None if keep is None else keep[order[m * per_mb : (m + 1) * per_mb]]
                dest_b = packing.plan_rows(mb_lengths, pack, keep_b=mb_keep)
                state, step_metrics = train_step(state, mb, packing.put_plan(dest_b, mesh))
                step_metrics = dict(step_metrics, **packing.plan_stats(dest_b, mb_lengths, pack))
            metrics.append(step_metrics)
    return state, metrics


def run_eval(s: Setup, params, step: int) -> dict[str, float]:
    if s.eval_pipeline is None:
        return {}
    s.eval_pipeline.set_state(s.eval_initial_state)
    rng = jax.random.fold_in(jax.random.key(s.cfg.train.seed + 1), step)
    t0 = time.perf_counter()
    got = grading.evaluate(  # one decode copy for the whole evaluation, dropped after it (LoRA: of the adapters)
        s.eval_sample, s.decode_weights(s.eval_sample, params), s.eval_pipeline, s.eval_records, s.verifier, s.tokenizer,
        k=s.cfg.train.eval_samples, rng=rng,
    )  # fmt: skip
    return {**got, "time/eval": time.perf_counter() - t0}  # the first includes compiling the held-out sampler


def _num_chunks(rl) -> int:
    """Row chunks of the full rollout batch that are one micro-batch each."""
    return rl.minibatches * rl.micro_batches


def _open_run(s: Setup, state: TrainState) -> tuple[int, TrainState, ckpt_lib.Checkpointer, dict]:
    """A fresh run in a clean workdir, or the exact continuation of the run saved there (trainer/run_state.py);
    the last item is the checkpoint's JSON part (``{}`` for a fresh run)."""
    tc = s.cfg.train
    directory = tc.checkpoint_dir or storage.join(tc.workdir, "checkpoints")
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
        return 0, state, checkpointer, {}

    def check(step, host):
        run_state.check_resume(host.get("config"), config_lib.to_dict(s.cfg), tc.workdir, step)
        if s.base_identity is not None:  # LoRA adapters fit only the base they were trained on
            adapters.check_base(host.get("lora_base"), s.base_identity, tc.workdir, step)

    try:  # the newest checkpoint that reads back (a truncated newer one is moved aside with a warning)
        start, state, host = checkpointer.restore_newest(state, check, s.log)
        s.train_pipeline.set_state(host["data"])
    except (ckpt_lib.CheckpointError, DataError) as e:
        raise run_state.ResumeMismatch(run_state.mismatch_message(tc.workdir, latest, str(e))) from None
    s.log(f"resumed from step {start} in {checkpointer.directory}")
    return start, state, checkpointer, host


def _log_line(step: int, row: dict, last_eval: dict) -> str:
    acc = next((f" held-out {k} {v:.3f}" for k, v in last_eval.items() if k.startswith("avg@") and "/" not in k), "")
    loss = row.get("loss", 0)  # None: a NaN/Inf update (skipped)
    return (f"step {step}: reward {row.get('reward/mean', 0):.3f} accuracy {row.get('accuracy', 0):.3f} "
            f"loss {float('nan') if loss is None else loss:.4g} clips {row.get('echo/num_clips', 0):.0f}{acc}")  # fmt: skip


# What build_setup bakes into a Setup (model and warm start, data pipelines, samplers, verifier, optimizer
# and its schedule length, the reference copy): a setup can be reused for a config that differs elsewhere.
SETUP_SECTIONS = ("model", "mesh", "dist", "data", "task", "sampling", "rl", "reward", "optim", "sft")
SETUP_KEYS = ("objective.expert_per_group", "train.steps", "train.eval_temperature", "train.eval_samples",
              "echo.delimiter_ids")


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
    start, state, checkpointer, host = _open_run(s, s.state)
    log = MetricsLog(tc.workdir, resume_step=start)
    train_step = _jit_train_step(s, state)
    pack_mb = pack_spec(cfg, minibatch_rows(cfg), s.mesh)  # a mini-batch's packed layout (None: padded rows)
    pack_all = pack_spec(cfg, rl.prompts_per_step * rl.group_size, s.mesh)  # the whole batch's (log-probs, echo)
    forward_logp, echo_norm = make_batch_passes(cfg, s.graphdef, s.train_temperature, s.mesh,
                                                jax.tree.map(lambda x: x.sharding, state.params))  # fmt: skip
    forward_ref = forward_logp  # LoRA: the base model's graph (adapters off) on the frozen weights
    if cfg.objective.kl_coef > 0 and s.ref_graphdef is not s.graphdef:
        forward_ref = make_batch_passes(cfg, s.ref_graphdef, s.train_temperature, s.mesh)[0]
    learner_pass = make_learner_pass(cfg, forward_logp)
    score = rollout_lib.make_scorer(cfg.objective, cfg.echo, s.delimiter_ids, cfg.sampling.max_new_tokens)
    schedule = update.make_schedule(cfg.optim, s.total_updates)
    preempt = _Preemption()
    guard = Guard(tc.collapse_guard, s.log)
    guard.load(host.get("guard"))  # the run's own history: a collapse that spans a restart is still seen
    nonfinite = NonFinite(tc.max_nonfinite_updates)
    base_key = jax.random.key(tc.seed)
    last_eval: dict[str, float] = {}
    if start == 0:
        last_eval = log.write(0, run_eval(s, state.params, 0), kind="eval")
        guard.update(last_eval, "eval")
    bar = s.progress(start, tc.steps)
    step = saved = start
    stopping = False  # SIGTERM on any process (decided together at the end of a step)
    stop_why = ""  # the collapse guard (train.collapse_guard=stop) or non-finite updates stopped the run
    lora_host = {"lora_base": s.base_identity} if s.base_identity is not None else {}  # LoRA: the base's identity

    def save():
        log.flush()  # a bucket's metrics.jsonl holds every row up to the checkpoint a restart resumes from
        checkpointer.save(step, state, {"data": s.train_pipeline.get_state(), "config": config_lib.to_dict(cfg),
                                        "guard": guard.state(), **lora_host})  # fmt: skip

    for step in range(start + 1, tc.steps + 1):
        timings: dict[str, float] = {}
        t_step = time.perf_counter()
        key = jax.random.fold_in(base_key, step)
        # The sampler decodes from a copy in the compute dtype and decode layout (sampling/layout.py),
        # made once per step; collect() holds the only reference, so it is freed once sampling is done.
        # LoRA: the adapted model (adapters + frozen base) as it is, no merged weights; the base's copy is kept.
        got = rollout_lib.collect(
            lambda: next(s.train_pipeline), s.sample, s.decode_weights(s.sample, state.params), key,
            verifier=s.verifier, tokenizer=s.tokenizer, group_size=rl.group_size,
            dynamic_sampling=cfg.objective.dynamic_sampling,
            echo_threshold=cfg.echo.success_threshold if cfg.echo.enabled else None,
            max_rounds=rl.max_sample_rounds, timings=timings, records=s.train_records,
            add_experts=s.experts.add_to if s.experts is not None else None,
        )  # fmt: skip
        ro = got.rollout
        t0 = time.perf_counter()
        reward_dev, adv_bt, clips = score(ro, jnp.asarray(got.reward_ng))  # reward_ng: every process's rows
        lengths, plan_all = None, ()  # packing: real tokens per row (host) and the whole batch's plan
        if pack_all is not None:
            lengths = np.asarray(sharding.to_host(jnp.sum(ro.valid, axis=1)))
            plan_all = (packing.put_plan(packing.plan_rows(lengths, pack_all), s.mesh),)
        expert_b = jnp.asarray(offpolicy.expert_rows(ro.tokens.shape[0], rl.group_size, k))
        policy = s.policy(state.params)  # LoRA: adapters + frozen base (two trees joined, no copy)
        # old log-probs, mismatch, correction (a rejected sequence leaves the loss mask and the EchoClip mask)
        learner = learner_pass(step, policy, ro, ~expert_b, clips.mask_bt, plan_all)
        old_logp = learner.old_logp_bt
        if cfg.objective.kl_coef > 0:
            ref_logp = forward_ref(s.ref_params, ro.tokens, ro.valid, *plan_all)
        else:
            ref_logp = jnp.zeros_like(old_logp)
        full = UpdateBatch(ro.tokens, ro.valid, learner.mask_bt, adv_bt, old_logp, ref_logp, learner.echo_mask_bt,
                           ro.response_mask & expert_b[:, None], learner.rc_weight_bt)  # fmt: skip
        extra = dict(learner.metrics)
        if echo_norm is not None and step % tc.echo_grad_norm_every == 0:
            args = (*plan_all,) if s.frozen is None else (plan_all[0] if plan_all else None, s.frozen)
            extra["echo/grad_norm"] = echo_norm(state.params, sharding.shard_batch(full, s.mesh), *args)
        keep = update.signal_rows(full, cfg.objective) if pack_mb is not None else None  # rows with a gradient
        state, update_metrics = _run_updates(train_step, state, full, s.mesh, rl, seed=tc.seed, step=step,
                                             pack=pack_mb, lengths=lengths, keep=keep)  # fmt: skip
        jax.block_until_ready(state.params)
        timings["update"] = time.perf_counter() - t0
        metrics = _rollout_metrics(ro, sharding.to_host(reward_dev), got.correct_ng, clips, got.info, got.rounds, k)
        metrics.update({k: np.mean([float(u[k]) for u in update_metrics]) for k in update_metrics[0]})
        skipped = [float(u["skipped_updates"]) for u in update_metrics]  # NaN/Inf updates, left undone
        metrics["skipped_updates"] = sum(skipped)
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
        stop_why = "collapse guard" if guard.update(row) else ""
        if nonfinite.update(skipped):
            stop_why = f"{nonfinite.in_a_row} non-finite updates in a row (train.max_nonfinite_updates)"
        if tc.eval_every > 0 and step % tc.eval_every == 0 and step != tc.steps:
            last_eval = log.write(step, run_eval(s, state.params, step), kind="eval")
            if guard.update(last_eval, "eval") and not stop_why:
                stop_why = "collapse guard"
        bar.update(row, last_eval)
        stopping = preempt.sync()
        if stopping or stop_why or (tc.save_every > 0 and step % tc.save_every == 0):
            save()
            saved = step
        if stopping or stop_why:
            s.log(f"{'SIGTERM' if stopping else stop_why}: saved step {step}, exiting")
            break
    stopped = stopping or bool(stop_why)
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
            s.export_adapter(storage.join(tc.workdir, "peft_adapter"))
        if s.frozen is None or cfg.model.lora.export_merged:
            s.export(storage.join(tc.workdir, "hf_export"))
    return {"step": step, "eval": last_eval, "workdir": tc.workdir, "setup": s}
