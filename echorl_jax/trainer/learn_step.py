"""The learning step: one scored batch in, the updated train state and the step's metrics out.

    learner passes over the whole batch (old / reference log-probs, mismatch and rollout correction, the echo
    gradient-norm diagnostic) -> UpdateBatch -> rl.epochs x rl.minibatches jitted train steps -> metrics

It consumes whatever a rollout source yields (trainer/rollout_source.py) and reads the batch's version tags
for the staleness metrics and to enforce ``rl.max_staleness`` (a loss token past it stops the run before
the update). The jitted programs are built here, once per run; plan.py lowers the same
ones (``jit_train_step``, ``make_batch_passes``, ``abstract_step_inputs``) to plan memory.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from echorl_jax import config as config_lib, sharding
from echorl_jax.rl import offpolicy, packing, update
from echorl_jax.rl.update import TrainState, UpdateBatch
from echorl_jax.trainer import rollout_source as source_lib
from echorl_jax.trainer.learner_pass import make_learner_pass
from echorl_jax.trainer.rollout_source import ScoredBatch
from echorl_jax.trainer.setup import Setup


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


def _num_chunks(rl) -> int:
    """Row chunks of the full rollout batch that are one micro-batch each."""
    return rl.minibatches * rl.micro_batches


def setup_train_step(s: Setup, state: TrainState):
    """The run's jitted train step, ``(state, batch[, dest_b])``; LoRA: with the setup's frozen base bound."""
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    frozen_sh = jax.tree.map(lambda x: x.sharding, s.frozen)
    step = jit_train_step(s.cfg, s.graphdef, s.optimizer, s.train_temperature, state_sh, s.mesh, frozen_sh)
    if s.frozen is None:
        return step
    return lambda state, batch, dest_b=None: step(state, batch, dest_b, s.frozen)


def run_updates(train_step, state: TrainState, full: UpdateBatch, mesh, rl, *, seed: int, step: int,
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


class Learned(NamedTuple):
    state: TrainState  # after the step's updates
    metrics: dict[str, Any]  # the step's train row, less the loop's own time/step and tokens_per_s
    skipped: list[float]  # one 0/1 per optimizer update, in order: 1 = a NaN/Inf update, left undone


def make_learn_step(s: Setup, state: TrainState) -> Callable[[TrainState, ScoredBatch, int], Learned]:
    """``learn(state, batch, step) -> Learned``: learning step ``step`` on ``batch`` (``state`` is donated).
    ``state`` here gives the shardings the train step is compiled for."""
    cfg = s.cfg
    tc, rl = cfg.train, cfg.rl
    num_expert = cfg.objective.expert_per_group  # LUFFY expert rows per group
    train_step = setup_train_step(s, state)
    pack_mb = pack_spec(cfg, minibatch_rows(cfg), s.mesh)  # a mini-batch's packed layout (None: padded rows)
    pack_all = pack_spec(cfg, rl.prompts_per_step * rl.group_size, s.mesh)  # the whole batch's (log-probs, echo)
    forward_logp, echo_norm = make_batch_passes(cfg, s.graphdef, s.train_temperature, s.mesh,
                                                jax.tree.map(lambda x: x.sharding, state.params))  # fmt: skip
    forward_ref = forward_logp  # LoRA: the base model's graph (adapters off) on the frozen weights
    if cfg.objective.kl_coef > 0 and s.ref_graphdef is not s.graphdef:
        forward_ref = make_batch_passes(cfg, s.ref_graphdef, s.train_temperature, s.mesh)[0]
    learner_pass = make_learner_pass(cfg, forward_logp)
    schedule = update.make_schedule(cfg.optim, s.total_updates)

    def learn(state: TrainState, batch: ScoredBatch, step: int, during_update=None) -> Learned:
        """``during_update()``: called as the step starts (a sampler mesh of its own then decodes the next batch
        while this step's passes and updates run); returns None or ``wait() -> (start, end)``, the sampler's busy
        interval, which is waited for after the updates."""
        t0 = time.perf_counter()
        sampler_wait = during_update() if during_update is not None else None
        ro, clips = batch.rollout, batch.clips
        lengths, plan_all = None, ()  # packing: real tokens per row (host) and the whole batch's plan
        if pack_all is not None:
            lengths = np.asarray(sharding.to_host(jnp.sum(ro.valid, axis=1)))
            plan_all = (packing.put_plan(packing.plan_rows(lengths, pack_all), s.mesh),)
        expert_b = jnp.asarray(offpolicy.expert_rows(ro.tokens.shape[0], rl.group_size, num_expert))
        policy = s.policy(state.params)  # LoRA: adapters + frozen base (two trees joined, no copy)
        # old log-probs, mismatch, correction (a rejected sequence leaves the loss mask and the EchoClip mask)
        learner = learner_pass(step, policy, ro, ~expert_b, clips.mask_bt, plan_all)
        old_logp = learner.old_logp_bt
        # How old the loss tokens are (0 for synchronous rollouts); a token past the bound stops the run here,
        # before any update (and before ``state`` is donated).
        staleness = source_lib.staleness_metrics(batch.version_bt, learner.mask_bt, step, rl.max_staleness)
        if cfg.objective.kl_coef > 0:
            ref_logp = forward_ref(s.ref_params, ro.tokens, ro.valid, *plan_all)
        else:
            ref_logp = jnp.zeros_like(old_logp)
        full = UpdateBatch(ro.tokens, ro.valid, learner.mask_bt, batch.adv_bt, old_logp, ref_logp,
                           learner.echo_mask_bt, ro.response_mask & expert_b[:, None], learner.rc_weight_bt)  # fmt: skip
        extra = dict(learner.metrics)
        if echo_norm is not None and step % tc.echo_grad_norm_every == 0:
            args = (*plan_all,) if s.frozen is None else (plan_all[0] if plan_all else None, s.frozen)
            extra["echo/grad_norm"] = echo_norm(state.params, sharding.shard_batch(full, s.mesh), *args)
        keep = update.signal_rows(full, cfg.objective) if pack_mb is not None else None  # rows with a gradient
        state, update_metrics = run_updates(train_step, state, full, s.mesh, rl, seed=tc.seed, step=step,
                                            pack=pack_mb, lengths=lengths, keep=keep)  # fmt: skip
        jax.block_until_ready(state.params)
        t1 = time.perf_counter()
        update_time = t1 - t0
        if sampler_wait is not None:  # both meshes' busy intervals as the host sees them (dispatch to done)
            a, b = sampler_wait()
            extra["time/sampler_start"] = a - t0  # from the learner's start (its busy interval: [0, time/update])
            extra["time/sampler_busy"] = b - a
            extra["time/both_busy"] = max(0.0, min(b, t1) - max(a, t0))
        metrics = source_lib.rollout_metrics(ro, sharding.to_host(batch.reward_ng), batch.correct_ng, clips,
                                             batch.info, batch.rounds, num_expert)  # fmt: skip
        metrics.update({k: np.mean([float(u[k]) for u in update_metrics]) for k in update_metrics[0]})
        skipped = [float(u["skipped_updates"]) for u in update_metrics]  # NaN/Inf updates, left undone
        metrics["skipped_updates"] = sum(skipped)
        metrics.update(extra)
        metrics.update(staleness)
        metrics.update(batch.source_metrics or {})
        metrics["lr"] = float(schedule(int(state.step) - 1))
        metrics.update({f"time/{k}": v for k, v in batch.timings.items()})
        metrics["time/update"] = update_time  # the learner passes and the optimizer updates
        return Learned(state, metrics, skipped)

    return learn
