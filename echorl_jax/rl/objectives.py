"""RLVR objectives as pure array functions: advantages, policy losses,
aggregation, KL, entropy bonus, DAPO pieces and the combined loss.

Layout: rollout rows are group-major, row ``b = n*G + g``; responses are
``[B, T]`` and ``mask_bt`` is a contiguous prefix of each row. Everything here
is jittable with fixed shapes; configs are frozen dataclasses used as static
arguments. Formulas are written out in docs/objectives.md.

Micro-batching: every loss term and metric is a *sum* over rows divided by
counts taken over the whole mini-batch (``GlobalCounts``), so summing
``total_loss`` (and its metrics) over micro-batches gives exactly the
whole-batch value and gradient.

Packing: the loss functions also take rows packed with several sequences each
(rl/packing.py). Per-sequence reductions go through ``layout`` (rl/segments.py):
``ROWS`` (the default) reduces along a row, a packed batch's ``Segments`` over each
token's sequence index, so one code path computes both, with equal values.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from echorl_jax.rl import echo as echo_lib
from echorl_jax.rl.segments import ROWS

ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce_pp")
POLICY_LOSSES = ("ppo", "gspo", "gspo_token", "cispo", "pg")
AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3")
ROLLOUT_CORRECTIONS = ("off", "token_tis", "seq_mask", "token_tis+seq_mask")  # rl/rollout_correction.py


def _check_choice(section: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{section}.{name}={value!r} is not allowed; expected one of {list(allowed)}")


def _check(section: str, name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"{section}.{name}={value!r} is invalid; expected {what}")


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    method: str = "grpo"  # informational name of the preset (see rl/methods.py)
    estimator: str = "grpo"  # advantage estimator: grpo | drgrpo | rloo | reinforce_pp
    policy_loss: str = "ppo"  # per-token surrogate: ppo | gspo | gspo_token | cispo | pg
    clip_low: float = 0.2  # ratio lower bound is 1 - clip_low (>= 1 means unbounded below)
    clip_high: float = 0.2  # ratio upper bound is 1 + clip_high (DAPO clip-higher: 0.28)
    dual_clip: float = 0.0  # 0 disables; else c > 1 caps the loss at -c*A for A < 0 (ppo/gspo)
    aggregation: str = "token-mean"  # token-mean | seq-mean-token-sum | seq-mean-token-mean | seq-mean-token-sum-norm
    norm_length: int = 0  # constant divisor for seq-mean-token-sum-norm; 0 = use T
    adv_eps: float = 1e-6  # added to std in grpo / reinforce_pp whitening
    logratio_clamp: float = 20.0  # |log pi - log pi_old| is clamped to this (k3: log(pi_ref/pi) <= this)
    kl_coef: float = 0.0  # weight of KL(pi || pi_ref) loss term; 0 = no reference policy needed
    kl_kind: str = "k3"  # KL estimator: k1 | k2 | k3 (low-variance)
    entropy_coef: float = 0.0  # entropy bonus weight (loss -= coef * entropy)
    # 0: the entropy is aggregated like the policy term. E > 0: as seq-mean-token-sum-norm with length E, whatever
    # the policy's aggregation (LUFFY's script: entropy a token mean per micro-batch, policy a token sum / T).
    entropy_norm_tokens: int = 0
    dynamic_sampling: bool = False  # DAPO: drop zero-variance groups and refill the batch
    overlong_buffer: int = 0  # DAPO overlong shaping buffer length in tokens; 0 = off
    overlong_penalty: float = 1.0  # DAPO penalty at the max length (reward -= up to this)
    expert_per_group: int = 0  # LUFFY: k of the G rows of each group are expert responses from the data; 0 = off
    shaping_gamma: float = 0.1  # LUFFY policy shaping on expert tokens: f(p) = p / (p + gamma)
    # Sampler/learner mismatch correction (verl's rollout correction; needs rl.recompute_logp): off | token_tis |
    # seq_mask | token_tis+seq_mask. token_tis weights the policy term by min(pi_learner/pi_sampler, C);
    # seq_mask drops sequences whose geometric-mean ratio leaves [1/C, C].
    rollout_correction: str = "off"
    rollout_tis_threshold: float = 2.0  # C of token_tis
    rollout_mask_threshold: float = 2.0  # C of seq_mask

    def validate(self) -> "ObjectiveConfig":
        s = "objective"
        _check_choice(s, "estimator", self.estimator, ESTIMATORS)
        _check_choice(s, "policy_loss", self.policy_loss, POLICY_LOSSES)
        _check_choice(s, "aggregation", self.aggregation, AGGREGATIONS)
        _check_choice(s, "kl_kind", self.kl_kind, KL_KINDS)
        _check(s, "clip_low", self.clip_low, self.clip_low >= 0, ">= 0")
        _check(s, "clip_high", self.clip_high, self.clip_high >= 0, ">= 0")
        _check(s, "dual_clip", self.dual_clip, self.dual_clip == 0 or self.dual_clip > 1, "0 (off) or > 1")
        _check(s, "norm_length", self.norm_length, self.norm_length >= 0, ">= 0 (0 = response length T)")
        _check(s, "adv_eps", self.adv_eps, self.adv_eps >= 0, ">= 0")
        _check(s, "logratio_clamp", self.logratio_clamp, self.logratio_clamp > 0, "> 0")
        _check(s, "kl_coef", self.kl_coef, self.kl_coef >= 0, ">= 0")
        _check(s, "entropy_coef", self.entropy_coef, self.entropy_coef >= 0, ">= 0")
        _check(s, "overlong_buffer", self.overlong_buffer, self.overlong_buffer >= 0, ">= 0 (0 = off)")
        _check(s, "overlong_penalty", self.overlong_penalty, self.overlong_penalty >= 0, ">= 0")
        _check(s, "expert_per_group", self.expert_per_group, self.expert_per_group >= 0, ">= 0 (0 = off)")
        _check(s, "shaping_gamma", self.shaping_gamma, self.shaping_gamma > 0, "> 0")
        _check(s, "entropy_norm_tokens", self.entropy_norm_tokens, self.entropy_norm_tokens >= 0,
               ">= 0 (0 = aggregate the entropy like the policy term)")
        _check_choice(s, "rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
        for key in ("rollout_tis_threshold", "rollout_mask_threshold"):
            _check(s, key, getattr(self, key), getattr(self, key) > 1, "> 1 (C: weights capped at C, "
                   "sequences kept within [1/C, C])")
        return self


# ----------------------------------------------------------------------------- advantages


def _whiten(centred, std, eps: float):
    """``centred / (std + eps)``, exactly 0 where the spread is 0 (also with eps = 0)."""
    return jnp.where(std > 0, centred / (std + eps), 0.0)


def group_baseline_advantage(reward_ng: jax.Array, estimator: str, eps: float) -> jax.Array:
    """Sequence-level advantage ``adv_ng`` before any token whitening.

    A group whose rewards are all equal gets exactly 0 for every estimator.
    """
    G = reward_ng.shape[1]
    # Centre on a group member first. Equal rewards then differ by exactly 0 and close ones
    # by their exact difference, so the mean/std below are accurate relative to the spread,
    # not the magnitude: the float32 mean of seven 0.9s is 1 ulp off, which GRPO's
    # 1/(std + eps) with std ~ 0 would turn into an advantage of -0.1 for every rollout.
    diff_ng = reward_ng - reward_ng[:, :1]
    centred_ng = diff_ng - diff_ng.mean(axis=1, keepdims=True)
    if estimator == "grpo":
        # Unbiased std; with G = 1 the centred reward is 0, so the divisor is irrelevant.
        std_n1 = jnp.sqrt((centred_ng**2).sum(axis=1, keepdims=True) / max(G - 1, 1))
        return _whiten(centred_ng, std_n1, eps)
    if estimator == "rloo":
        # r_i - mean_{j != i} r_j == G/(G-1) (r_i - mu); G = 1 has no baseline -> 0.
        return centred_ng * (G / max(G - 1, 1))
    if estimator in ("drgrpo", "reinforce_pp"):
        return centred_ng
    raise ValueError(f"objective.estimator={estimator!r} is not one of {list(ESTIMATORS)}")


def compute_advantages(reward_ng: jax.Array, mask_bt: jax.Array, cfg: ObjectiveConfig) -> jax.Array:
    """Outcome advantages ``adv_bt`` float32 [B, T], zero on padding.

    reinforce_pp: group-mean baseline, then whitened over the valid tokens of the
    whole batch given here (token-weighted mean, unbiased std, ``/(std + eps)``);
    if every valid token has the same value the result is exactly 0.
    """
    N, G = reward_ng.shape
    mask_bt = mask_bt.astype(bool)
    adv_b = group_baseline_advantage(reward_ng.astype(jnp.float32), cfg.estimator, cfg.adv_eps).reshape(N * G)
    adv_bt = jnp.where(mask_bt, adv_b[:, None], 0.0)
    if cfg.estimator == "reinforce_pp":
        n = mask_bt.sum().astype(jnp.float32)
        # Same shift as in group_baseline_advantage, by the first valid token's value.
        first = jnp.argmax(mask_bt.reshape(-1))
        x_bt = jnp.where(mask_bt, adv_bt - adv_bt.reshape(-1)[first], 0.0)
        d_bt = jnp.where(mask_bt, x_bt - x_bt.sum() / jnp.maximum(n, 1.0), 0.0)
        std = jnp.sqrt((d_bt**2).sum() / jnp.maximum(n - 1.0, 1.0))
        adv_bt = jnp.where(mask_bt, _whiten(d_bt, std, cfg.adv_eps), 0.0)
    return adv_bt


# ----------------------------------------------------------------------------- DAPO pieces


def overlong_shaping(length_b: jax.Array, max_len: int, cfg: ObjectiveConfig) -> jax.Array:
    """DAPO soft overlong penalty ``penalty_b`` (<= 0) to add to the reward.

    0 up to ``max_len - buffer`` tokens, then linear down to ``-overlong_penalty``
    at ``max_len`` (and beyond).
    """
    buf = cfg.overlong_buffer
    if buf == 0:
        return jnp.zeros(length_b.shape, jnp.float32)
    if buf >= max_len:
        raise ValueError(
            f"objective.overlong_buffer={buf} must be smaller than the max response length {max_len}"
        )
    over = length_b.astype(jnp.float32) - (max_len - buf)
    return -cfg.overlong_penalty * jnp.clip(over / buf, 0.0, 1.0)


def zero_variance_groups(reward_ng: jax.Array) -> jax.Array:
    """DAPO dynamic-sampling filter: ``keep_n`` is True for groups whose rewards
    are NOT all equal (groups with zero variance give zero advantage)."""
    return reward_ng.max(axis=1) > reward_ng.min(axis=1)


def kept_group_rows(keep_n: np.ndarray, group_size: int, max_groups: int | None = None):
    """Host-side refill helper: indices of the first ``max_groups`` kept groups
    (``group_idx_k``) and their rows in group-major order (``row_idx_kg``, [K*G]).

    The trainer accumulates these across sampling rounds until it has N groups.
    """
    group_idx_k = np.flatnonzero(np.asarray(keep_n))
    if max_groups is not None:
        group_idx_k = group_idx_k[:max_groups]
    row_idx = (group_idx_k[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
    return group_idx_k, row_idx


# ----------------------------------------------------------------------------- losses


class LossBatch(NamedTuple):
    mask_bt: jax.Array  # bool [B, T] response tokens
    adv_bt: jax.Array  # f32 [B, T] advantages (constant along a row for outcome rewards)
    old_logp_bt: jax.Array  # f32 [B, T] behaviour log-probs
    ref_logp_bt: jax.Array  # f32 [B, T] reference log-probs; ignored when kl_coef == 0
    echo_mask_bt: jax.Array  # bool [B, T] EchoClip tokens (echo.echo_clips)
    offpolicy_bt: jax.Array | None = None  # bool [B, T] expert (off-policy) tokens (LUFFY); None = none
    rc_weight_bt: jax.Array | None = None  # f32 [B, T] rollout-correction weight on the on-policy term; None = 1


class GlobalCounts(NamedTuple):
    num_tokens: jax.Array  # f32 scalar: valid tokens in the whole mini-batch
    num_seqs: jax.Array  # f32 scalar: rows with at least one valid token
    num_clips: jax.Array  # f32 scalar: rows holding an EchoClip
    num_offpolicy_tokens: jax.Array = 0.0  # f32 scalar: valid expert tokens (LUFFY)


def global_counts(mask_bt: jax.Array, echo_mask_bt: jax.Array, offpolicy_bt: jax.Array | None = None) -> GlobalCounts:
    """Counts over the WHOLE mini-batch; call before splitting into micro-batches."""
    f32 = jnp.float32
    off = jnp.zeros((), f32) if offpolicy_bt is None else (mask_bt.astype(bool) & offpolicy_bt.astype(bool)).sum().astype(f32)
    return GlobalCounts(
        num_tokens=mask_bt.sum().astype(f32),
        num_seqs=mask_bt.any(axis=1).sum().astype(f32),
        num_clips=echo_mask_bt.any(axis=1).sum().astype(f32),
        num_offpolicy_tokens=off,
    )


def aggregate(loss_bt: jax.Array, mask_bt: jax.Array, counts: GlobalCounts, mode: str, norm_length: int = 0,
              layout=ROWS):  # fmt: skip
    """Reduce per-token values to a scalar with global counts (micro-batch additive)."""
    mask = mask_bt.astype(loss_bt.dtype)
    tok_sum_b = layout.seq_sum(loss_bt * mask)
    n_tok = jnp.maximum(counts.num_tokens, 1.0)
    n_seq = jnp.maximum(counts.num_seqs, 1.0)
    if mode == "token-mean":
        return tok_sum_b.sum() / n_tok
    if mode == "seq-mean-token-sum":
        return tok_sum_b.sum() / n_seq
    if mode == "seq-mean-token-mean":
        # The per-row length is local to a row, so this stays micro-batch additive.
        return (tok_sum_b / jnp.maximum(layout.seq_sum(mask), 1.0)).sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        L = norm_length or layout.response_len(loss_bt)  # Dr.GRPO: constant length, no length bias
        return tok_sum_b.sum() / (n_seq * L)
    raise ValueError(f"objective.aggregation={mode!r} is not one of {list(AGGREGATIONS)}")


def policy_loss_bt(logp_bt, old_logp_bt, adv_bt, mask_bt, cfg: ObjectiveConfig, layout=ROWS):
    """Per-token surrogate loss ``loss_bt`` and ``clipped_bt`` (bool) indicator."""
    mask = mask_bt.astype(bool)
    # Padding log-probs may be garbage (-inf); zero them so no NaN leaks into gradients.
    logp_bt = jnp.where(mask, logp_bt, 0.0)
    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    log_ratio_bt = jnp.where(mask, logp_bt - jnp.where(mask, old_logp_bt, 0.0), 0.0)
    log_ratio_bt = jnp.clip(log_ratio_bt, -cfg.logratio_clamp, cfg.logratio_clamp)
    kind = cfg.policy_loss
    if kind in ("gspo", "gspo_token"):
        n_b = jnp.maximum(layout.seq_sum(mask), 1)
        seq_log_ratio_b = layout.seq_sum(log_ratio_bt) / n_b  # log of geometric-mean token ratio
        if kind == "gspo":
            # Sequence ratio broadcast to tokens; needs adv constant along a row.
            log_ratio_bt = jnp.broadcast_to(layout.to_tokens(seq_log_ratio_b), log_ratio_bt.shape)
        else:
            # GSPO-token: value = sequence ratio, gradient flows per token (token advantages allowed).
            sg = jax.lax.stop_gradient
            log_ratio_bt = layout.to_tokens(sg(seq_log_ratio_b)) + logp_bt - sg(logp_bt)
    ratio_bt = jnp.exp(log_ratio_bt)
    if kind == "cispo":
        w_bt = jax.lax.stop_gradient(jnp.clip(ratio_bt, max(lo, 0.0), hi))
        loss_bt = -w_bt * adv_bt * logp_bt
        clipped_bt = (ratio_bt < lo) | (ratio_bt > hi)
    elif kind == "pg":
        # Unclipped importance-weighted REINFORCE: gradient -A * rho * grad log pi.
        loss_bt = -adv_bt * ratio_bt
        clipped_bt = jnp.zeros_like(mask)
    else:  # ppo, gspo, gspo_token share the PPO clip (and the optional dual clip)
        unclipped_bt = -adv_bt * ratio_bt
        clipped_loss_bt = -adv_bt * jnp.clip(ratio_bt, lo, hi)
        loss_bt = jnp.maximum(unclipped_bt, clipped_loss_bt)
        clipped_bt = clipped_loss_bt > unclipped_bt
        if cfg.dual_clip > 0:
            # Dual clip: for A < 0 a huge ratio cannot make the loss exceed -c*A.
            capped_bt = jnp.minimum(loss_bt, -cfg.dual_clip * adv_bt)
            clipped_bt = clipped_bt | ((adv_bt < 0) & (capped_bt < loss_bt))
            loss_bt = jnp.where(adv_bt < 0, capped_bt, loss_bt)
    return jnp.where(mask, loss_bt, 0.0), clipped_bt & mask


def offpolicy_loss_bt(logp_bt, adv_bt, offpolicy_bt, gamma: float):
    """LUFFY per-token loss on expert tokens: ``-f(pi_theta) * A`` with policy shaping
    ``f(p) = p / (p + gamma)``; the behaviour probability is taken as 1 (importance weight
    ``pi_theta / 1``) and nothing is clipped. The gradient flows through ``pi_theta``:
    ``d loss / d log pi = -A * gamma * p / (p + gamma)^2``, largest for tokens the policy finds
    unlikely (p ~ gamma) rather than vanishing with p as the plain ratio's ``p`` would.
    """
    off = offpolicy_bt.astype(bool)
    p_bt = jnp.exp(jnp.where(off, logp_bt, 0.0))  # padding/on-policy: p = 1, then zeroed
    return jnp.where(off, -(p_bt / (p_bt + gamma)) * adv_bt, 0.0)


def kl_bt(logp_bt, ref_logp_bt, kind: str, clamp: float = 20.0):
    """Per-token KL(pi || pi_ref) estimators on samples from pi (Schulman)."""
    log_r_bt = ref_logp_bt - logp_bt  # log(pi_ref / pi)
    if kind == "k1":
        return -log_r_bt
    if kind == "k2":
        return 0.5 * log_r_bt**2
    if kind == "k3":
        # Guard only the overflow side: a strongly under-weighted token (log r << 0)
        # keeps its true value and gradient. expm1 keeps small values accurate.
        log_r_bt = jnp.minimum(log_r_bt, clamp)
        return jnp.expm1(log_r_bt) - log_r_bt
    raise ValueError(f"objective.kl_kind={kind!r} is not one of {list(KL_KINDS)}")


def entropy_term(entropy_bt, mask_bt, counts: GlobalCounts, obj: ObjectiveConfig, layout=ROWS):
    """The entropy the bonus multiplies: aggregated like the policy term, or with ``entropy_norm_tokens = E``
    as ``Σ H / (num_seqs · E)``. LUFFY's script averages the entropy over each micro-batch's tokens while its
    policy term is a token sum over the fixed length T; with the policy as seq-mean-token-sum-norm (length T),
    E = the script's response tokens per micro-batch gives its relative weight (docs/recipes.md)."""
    if obj.entropy_norm_tokens > 0:
        return aggregate(entropy_bt, mask_bt, counts, "seq-mean-token-sum-norm", obj.entropy_norm_tokens, layout)
    return aggregate(entropy_bt, mask_bt, counts, obj.aggregation, obj.norm_length, layout)


def total_loss(
    logp_bt, entropy_bt, batch: LossBatch, counts: GlobalCounts, obj: ObjectiveConfig, echo: echo_lib.EchoConfig | None,
    layout=ROWS, metric_counts: GlobalCounts | None = None,
):
    """Combined loss for one (micro-)batch and its additive metrics.

    loss = agg(policy) + kl_coef*agg(KL) - entropy_coef*agg(H) + echo.coef*L_echo.
    ``logp_bt``/``entropy_bt`` come from the current policy's single forward pass. With
    ``batch.offpolicy_bt`` (LUFFY), "policy" is the clipped surrogate on on-policy tokens plus
    ``offpolicy_loss_bt`` on expert tokens, aggregated together over all valid tokens.
    ``layout``: how tokens group into sequences (``ROWS``, or a packed batch's ``Segments``).
    ``metric_counts``: the counts the per-token metrics (entropy, clip_frac, approx_kl_old) average over,
    when the pass computes only some of the mini-batch's rows (rows with no gradient skipped); default
    ``counts``. The loss always uses ``counts``.
    """
    mask = batch.mask_bt.astype(bool)
    off = jnp.zeros_like(mask) if batch.offpolicy_bt is None else mask & batch.offpolicy_bt.astype(bool)
    on = mask & ~off
    # Padding values may be garbage (-inf / NaN); zero them so gradients stay finite.
    logp_bt = jnp.where(mask, logp_bt, 0.0)
    entropy_bt = jnp.where(mask, entropy_bt, 0.0)
    ref_logp_bt = jnp.where(mask, batch.ref_logp_bt, 0.0)
    agg = lambda x_bt: aggregate(x_bt, mask, counts, obj.aggregation, obj.norm_length, layout)
    pl_bt, clipped_bt = policy_loss_bt(logp_bt, batch.old_logp_bt, batch.adv_bt, on, obj, layout)
    if batch.rc_weight_bt is not None:  # truncated IS from the sampler to the learner (rl/rollout_correction.py)
        pl_bt = pl_bt * jnp.where(on, batch.rc_weight_bt, 0.0)
    if batch.offpolicy_bt is not None:
        pl_bt = pl_bt + offpolicy_loss_bt(logp_bt, batch.adv_bt, off, obj.shaping_gamma)
    pg_loss = agg(pl_bt)
    entropy = entropy_term(entropy_bt, mask, counts, obj, layout)
    loss = pg_loss - obj.entropy_coef * entropy
    mc = counts if metric_counts is None else metric_counts
    if metric_counts is not None:
        entropy = entropy_term(entropy_bt, mask, mc, obj, layout)  # the metric; the loss used counts
    n_tok = jnp.maximum(mc.num_tokens, 1.0)
    # Expert tokens have no behaviour policy to drift from: the drift metric is over on-policy tokens.
    n_on = jnp.maximum(mc.num_tokens - mc.num_offpolicy_tokens, 1.0)
    sg_log_ratio_bt = jax.lax.stop_gradient(jnp.where(on, logp_bt - batch.old_logp_bt, 0.0))
    sg_log_ratio_bt = jnp.clip(sg_log_ratio_bt, -obj.logratio_clamp, obj.logratio_clamp)
    metrics = {
        "pg_loss": pg_loss,
        "entropy": entropy,
        "clip_frac": clipped_bt.sum() / n_tok,
        # k3 estimate of KL(pi_old || pi) on the behaviour samples (r = pi/pi_old): drift of this update.
        "approx_kl_old": jnp.where(on, jnp.expm1(sg_log_ratio_bt) - sg_log_ratio_bt, 0.0).sum() / n_on,
    }
    if obj.expert_per_group > 0:  # LUFFY: mean pi_theta of the expert tokens (how far the policy is from them)
        p_off = jnp.where(off, jnp.exp(jax.lax.stop_gradient(logp_bt)), 0.0)
        metrics["offpolicy_prob"] = p_off.sum() / jnp.maximum(mc.num_offpolicy_tokens, 1.0)
    if obj.kl_coef > 0:
        kl = agg(jnp.where(mask, kl_bt(logp_bt, ref_logp_bt, obj.kl_kind, obj.logratio_clamp), 0.0))
        loss = loss + obj.kl_coef * kl
        metrics["kl_ref"] = kl
    if echo is not None and echo.enabled:
        l_echo = echo_lib.echo_loss(logp_bt, batch.echo_mask_bt, counts.num_clips, layout)
        loss = loss + echo.coef * l_echo
        metrics["echo_loss"] = l_echo
    metrics["loss"] = loss
    return loss, jax.tree.map(jax.lax.stop_gradient, metrics)
