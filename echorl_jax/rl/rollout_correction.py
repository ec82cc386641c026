"""Sampler/learner mismatch: how far the learner's log-probs of the rollout tokens are from the sampler's,
and verl-style rollout correction of it (docs/objectives.md, "Rollout correction").

The sampler and the learner share one set of parameters, but not one computation: the sampler decodes
with a KV cache (one position at a time), the learner runs the whole sequence at once, and in bfloat16
the two round differently. With ``rl.recompute_logp`` the learner's log-probs ``learner_logp_bt`` are
the old policy of the PPO ratio and the sampler's ``sampler_logp_bt`` are the behaviour policy that
drew the tokens; ``Δ = learner_logp − sampler_logp`` per token.

Rollout correction (verl, ``docs/algo/rollout_corr.md``, decoupled mode), computed outside the train
step because both log-probs are known before the update:

- ``token_tis``: truncated importance sampling, per-token weight ``min(exp(Δ), C)`` on the
  policy-gradient term (``objective.rollout_tis_threshold`` = C); ``Δ`` is first bounded to
  ``±LOG_BOUND`` as verl bounds it.
- ``seq_mask``: sequences whose geometric-mean ratio ``exp(mean_t Δ)`` leaves ``[1/C, C]``
  (``objective.rollout_mask_threshold`` = C) leave the loss: their tokens leave the loss mask and their
  EchoClip leaves the echo mask, so they count in no normaliser either (verl's rejection modifies the
  response mask). ``rollout_correction`` returns both masks, the one place the rejection is applied:
  the loss, its counts, the echo diagnostic and the packed step's row choice all read them.

Expert rows (LUFFY) were not drawn by the sampler; callers pass ``sampled_b`` so they get weight 1,
are never masked and stay out of the metrics. Everything here is pure ``jnp`` over fixed shapes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from echorl_jax.rl.objectives import ROLLOUT_CORRECTIONS as MODES, ObjectiveConfig  # noqa: F401  (MODES re-exported)

LOG_BOUND = 20.0  # verl's safety bound on log-ratios before exp
OUT_LO, OUT_HI = 0.5, 2.0  # "ratio outside [0.5, 2]" in the mismatch metrics


def uses_tis(mode: str) -> bool:
    return "token_tis" in mode.split("+")


def uses_seq_mask(mode: str) -> bool:
    return "seq_mask" in mode.split("+")


class Correction(NamedTuple):
    weight_bt: jax.Array | None  # f32 [B, T] weight on the policy-gradient term; None = no token IS
    keep_b: jax.Array  # bool [B] sequences that stay in the loss
    mask_bt: jax.Array  # bool [B, T] the response mask less the rejected sequences
    echo_mask_bt: jax.Array  # bool [B, T] the EchoClips less those of the rejected sequences
    metrics: dict  # rollout_corr/* scalars


def _masks(learner_logp_bt, sampler_logp_bt, mask_bt, sampled_b):
    mask = mask_bt.astype(bool) & sampled_b.astype(bool)[:, None]
    delta_bt = jnp.where(mask, learner_logp_bt - sampler_logp_bt, 0.0).astype(jnp.float32)
    return mask, delta_bt


def mismatch_metrics(learner_logp_bt, sampler_logp_bt, mask_bt, sampled_b) -> dict:
    """Sampler-vs-learner mismatch on the sampled rows' valid tokens, ``mismatch/*``:

    per token (over every valid token): ``tok_abs_mean`` / ``tok_abs_max`` of ``|Δ|``, ``tok_mean`` of
    ``Δ``, ``tok_k3`` = mean of ``e^Δ − 1 − Δ`` (k3 estimate of KL(sampler || learner) per token),
    ``tok_out_frac`` = fraction with ratio ``e^Δ`` outside [0.5, 2];
    per sequence (``d_b = mean_t Δ``, the log of the geometric-mean ratio): ``seq_abs_mean`` /
    ``seq_abs_max`` of ``|d_b|``, ``seq_k3`` = mean over sequences of ``Σ_t k3_t`` (the sequence-level
    KL estimate), ``seq_out_frac`` = fraction with ``e^{d_b}`` outside [0.5, 2].
    """
    mask, delta = _masks(learner_logp_bt, sampler_logp_bt, mask_bt, sampled_b)
    f = mask.astype(jnp.float32)
    n_tok = jnp.maximum(f.sum(), 1.0)
    d_clamped = jnp.minimum(delta, LOG_BOUND)  # e^Δ overflows past ~88; the bound keeps k3 finite
    k3_bt = jnp.where(mask, jnp.expm1(d_clamped) - d_clamped, 0.0)
    abs_bt = jnp.abs(delta)
    out_bt = mask & ((delta < jnp.log(OUT_LO)) | (delta > jnp.log(OUT_HI)))
    n_b = f.sum(axis=1)
    has_b = n_b > 0
    n_seq = jnp.maximum(has_b.sum().astype(jnp.float32), 1.0)
    d_b = delta.sum(axis=1) / jnp.maximum(n_b, 1.0)
    seq_out_b = has_b & ((d_b < jnp.log(OUT_LO)) | (d_b > jnp.log(OUT_HI)))
    return {
        "mismatch/tok_abs_mean": abs_bt.sum() / n_tok,
        "mismatch/tok_abs_max": abs_bt.max(),
        "mismatch/tok_mean": delta.sum() / n_tok,
        "mismatch/tok_k3": k3_bt.sum() / n_tok,
        "mismatch/tok_out_frac": out_bt.sum() / n_tok,
        "mismatch/seq_abs_mean": jnp.where(has_b, jnp.abs(d_b), 0.0).sum() / n_seq,
        "mismatch/seq_abs_max": jnp.where(has_b, jnp.abs(d_b), 0.0).max(),
        "mismatch/seq_k3": k3_bt.sum() / n_seq,
        "mismatch/seq_out_frac": seq_out_b.sum() / n_seq,
    }


def rollout_correction(learner_logp_bt, sampler_logp_bt, mask_bt, echo_mask_bt, sampled_b,
                       cfg: ObjectiveConfig) -> Correction:  # fmt: skip
    """The correction ``cfg.rollout_correction`` asks for (see the module docstring). ``mask_bt``: the
    response mask; ``echo_mask_bt``: the EchoClips (``echo.echo_clips``). A rejected sequence leaves both,
    so it adds nothing to any loss term or normaliser (``num_tokens``, ``num_seqs``, ``num_clips``)."""
    mode = cfg.rollout_correction
    mask, delta = _masks(learner_logp_bt, sampler_logp_bt, mask_bt, sampled_b)
    delta = jnp.clip(delta, -LOG_BOUND, LOG_BOUND)
    n_tok = jnp.maximum(mask.sum().astype(jnp.float32), 1.0)
    metrics = {}
    weight_bt = None
    if uses_tis(mode):
        c = cfg.rollout_tis_threshold
        ratio_bt = jnp.exp(delta)
        # Sampled tokens: min(ratio, C); expert rows and padding: 1 (no correction; padding carries no loss).
        weight_bt = jnp.where(mask, jnp.minimum(ratio_bt, c), 1.0)
        metrics["rollout_corr/tis_mean"] = jnp.where(mask, weight_bt, 0.0).sum() / n_tok
        metrics["rollout_corr/tis_truncated_frac"] = (mask & (ratio_bt > c)).sum() / n_tok
        # quantiles of the untruncated ratio proximal/behaviour over the sampled tokens (streaming: how far
        # carried tokens' behaviour policy is from the learner's); NaN-free: 1 when no token is sampled
        qs = jnp.nanquantile(jnp.where(mask, ratio_bt, jnp.nan), jnp.asarray([0.01, 0.5, 0.99]))
        for name, v in zip(("p01", "p50", "p99"), qs):
            metrics[f"rollout_corr/ratio_{name}"] = jnp.where(mask.any(), v, 1.0)
    n_b = mask.sum(axis=1)
    keep_b = jnp.ones(mask.shape[0], bool)
    if uses_seq_mask(mode):
        c = cfg.rollout_mask_threshold
        log_geo_b = delta.sum(axis=1) / jnp.maximum(n_b, 1)
        drop_b = (n_b > 0) & ((log_geo_b < -jnp.log(c)) | (log_geo_b > jnp.log(c)))
        keep_b = ~drop_b
        metrics["rollout_corr/seq_masked_frac"] = drop_b.sum() / jnp.maximum((n_b > 0).sum(), 1)
        # echo/num_clips counts the clips EchoRL chose; this many of them left the loss with their sequence.
        clip_b = echo_mask_bt.astype(bool).any(axis=1)
        metrics["rollout_corr/seq_masked_clips"] = (drop_b & clip_b).sum(dtype=jnp.float32)
    keep_b1 = keep_b[:, None]
    mask_bt, echo_mask_bt = mask_bt.astype(bool) & keep_b1, echo_mask_bt.astype(bool) & keep_b1
    return Correction(weight_bt, keep_b, mask_bt, echo_mask_bt, metrics)

