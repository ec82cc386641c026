"""The learner's pass over a step's rollout before the update: old log-probs, mismatch metrics, correction.

With ``rl.recompute_logp`` the learner recomputes the log-probs of the rollout tokens (one forward over the
whole batch, ``update.make_forward_logp``); they are the old policy of the update, and comparing them with
the sampler's gives the ``mismatch/*`` metrics for free. Without it the sampler's log-probs are the old
policy and the same forward runs only every ``train.mismatch_every`` steps, to measure. Rollout
correction (``objective.rollout_correction``) turns the two log-probs into a per-token weight and a
sequence mask (``rl/rollout_correction.py``), which it applies to the loss mask and the EchoClip mask
alike; it needs the recomputed log-probs (checked in config.py).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

from echorl_jax.rl import rollout_correction as rc


class LearnerPass(NamedTuple):
    old_logp_bt: jax.Array  # f32 [B, T] the update's old policy
    mask_bt: jax.Array  # bool [B, T] the rollout's response mask less the sequences rollout correction drops
    echo_mask_bt: jax.Array  # bool [B, T] the EchoClips less those of the sequences rollout correction drops
    rc_weight_bt: jax.Array | None  # f32 [B, T] token IS weight; None = no correction
    metrics: dict[str, Any]  # mismatch/* and rollout_corr/* (empty on steps that do not measure)


def measures(cfg, step: int) -> bool:
    """Whether step ``step`` runs the learner's forward over the rollout."""
    every = cfg.train.mismatch_every
    return cfg.rl.recompute_logp or (every > 0 and step % every == 0)


def make_learner_pass(cfg, forward_logp: Callable | None) -> Callable:
    """``run(step, params, rollout, sampled_b, echo_mask_bt, plan=()) -> LearnerPass``; ``sampled_b`` bool
    ``[B]``: rows the sampler drew (LUFFY's expert rows are not: no correction, not in the metrics);
    ``echo_mask_bt``: the step's EchoClips; ``plan``: the whole batch's packing plan when the learner packs
    (``(dest_b,)``), else ``()``."""
    obj = cfg.objective

    @jax.jit
    def stats(learner_bt, sampler_bt, mask_bt, echo_mask_bt, sampled_b):
        metrics = rc.mismatch_metrics(learner_bt, sampler_bt, mask_bt, sampled_b)
        corr = rc.rollout_correction(learner_bt, sampler_bt, mask_bt, echo_mask_bt, sampled_b, obj)
        return metrics, corr

    def run(step: int, params, ro, sampled_b, echo_mask_bt, plan=()) -> LearnerPass:
        if not measures(cfg, step):
            return LearnerPass(ro.behaviour_logp, ro.response_mask, echo_mask_bt, None, {})
        learner_bt = forward_logp(params, ro.tokens, ro.valid, *plan)
        metrics, corr = stats(learner_bt, ro.behaviour_logp, ro.response_mask, echo_mask_bt, sampled_b)
        if not cfg.rl.recompute_logp:  # measured only
            return LearnerPass(ro.behaviour_logp, ro.response_mask, echo_mask_bt, None, metrics)
        return LearnerPass(learner_bt, corr.mask_bt, corr.echo_mask_bt, corr.weight_bt, {**metrics, **corr.metrics})

    return run
