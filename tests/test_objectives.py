"""Objectives against independent numpy references (loops, textbook forms)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from echorl_jax.rl import objectives as O
from echorl_jax.rl.echo import EchoConfig
from echorl_jax.rl.objectives import LossBatch, ObjectiveConfig

# ----------------------------------------------------------------------------- references


def ref_advantages(reward, lengths, T, estimator, eps=1e-6):
    reward = np.asarray(reward, np.float64)
    N, G = reward.shape
    adv = np.zeros((N, G))
    for n in range(N):
        for g in range(G):
            r = reward[n]
            if estimator == "grpo":
                std = np.std(r, ddof=1) if G > 1 else 0.0
                adv[n, g] = (r[g] - r.mean()) / (std + eps)
            elif estimator == "rloo":
                adv[n, g] = r[g] - np.mean(np.delete(r, g)) if G > 1 else 0.0
            else:
                adv[n, g] = r[g] - r.mean()
    out = np.zeros((N * G, T))
    for b in range(N * G):
        out[b, : lengths[b]] = adv.reshape(-1)[b]
    if estimator == "reinforce_pp":
        vals = np.concatenate([out[b, : lengths[b]] for b in range(N * G)])
        std = np.std(vals, ddof=1) if vals.size > 1 else 0.0
        for b in range(N * G):
            out[b, : lengths[b]] = (out[b, : lengths[b]] - vals.mean()) / (std + eps)
    return out


def ref_token_loss(logp, old, adv, lengths, cfg):
    """Per-token loss from the papers' min/max forms, row by row."""
    B, T = logp.shape
    lo, hi = 1 - cfg.clip_low, 1 + cfg.clip_high
    out = np.zeros((B, T))
    for b in range(B):
        L = lengths[b]
        if L == 0:
            continue
        lr = np.clip(logp[b, :L] - old[b, :L], -cfg.logratio_clamp, cfg.logratio_clamp)
        A = adv[b, :L]
        if cfg.policy_loss in ("gspo", "gspo_token"):
            s = np.exp(np.mean(lr))
            ratio = np.full(L, s)
        else:
            ratio = np.exp(lr)
        if cfg.policy_loss == "cispo":
            out[b, :L] = -np.clip(ratio, max(lo, 0), hi) * A * logp[b, :L]
        elif cfg.policy_loss == "pg":
            out[b, :L] = -A * ratio
        else:
            obj = np.minimum(ratio * A, np.clip(ratio, lo, hi) * A)
            if cfg.dual_clip:
                obj = np.where(A < 0, np.maximum(obj, cfg.dual_clip * A), obj)
            out[b, :L] = -obj
    return out


def ref_aggregate(x, lengths, mode, norm_length=0):
    B, T = x.shape
    rows = [x[b, : lengths[b]] for b in range(B) if lengths[b] > 0]
    if not rows:
        return 0.0
    if mode == "token-mean":
        return np.concatenate(rows).mean()
    if mode == "seq-mean-token-sum":
        return np.mean([r.sum() for r in rows])
    if mode == "seq-mean-token-mean":
        return np.mean([r.mean() for r in rows])
    return np.mean([r.sum() / (norm_length or T) for r in rows])


def ref_kl(logp, ref, kind):
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    ratio = np.exp(ref - logp)  # pi_ref / pi
    return ratio - 1 - np.log(ratio)


# ----------------------------------------------------------------------------- fixtures


def make_batch(rng, N=3, G=4, T=7, lengths=None, scale=0.5):
    B = N * G
    if lengths is None:
        lengths = rng.integers(0, T + 1, size=B)
        lengths[0] = T  # at least one full row
    mask = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    logp = -rng.uniform(0.05, 3.0, size=(B, T))
    old = logp + rng.normal(0, scale, size=(B, T))
    refl = logp + rng.normal(0, scale, size=(B, T))
    reward = rng.integers(0, 2, size=(N, G)).astype(np.float32)
    ent = rng.uniform(0, 2, size=(B, T))
    return dict(lengths=np.asarray(lengths), mask=mask, logp=logp, old=old, ref=refl, reward=reward, ent=ent)


def counts_of(mask, echo_mask=None):
    echo_mask = np.zeros_like(mask) if echo_mask is None else echo_mask
    return O.global_counts(jnp.asarray(mask), jnp.asarray(echo_mask))


f32 = lambda x: jnp.asarray(x, jnp.float32)

# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("estimator", O.ESTIMATORS)
@pytest.mark.parametrize("G", [1, 2, 5])
def test_advantages_random(estimator, G):
    rng = np.random.default_rng(G)
    N, T = 4, 6
    reward = rng.normal(size=(N, G)).astype(np.float32)
    reward[0] = 0.7  # one degenerate group
    lengths = rng.integers(0, T + 1, size=N * G)
    mask = np.arange(T)[None] < lengths[:, None]
    cfg = ObjectiveConfig(estimator=estimator)
    got = O.compute_advantages(f32(reward), jnp.asarray(mask), cfg)
    np.testing.assert_allclose(got, ref_advantages(reward, lengths, T, estimator), rtol=2e-5, atol=2e-5)
    assert np.all(np.asarray(got)[~mask] == 0)


@pytest.mark.parametrize("estimator", O.ESTIMATORS)
def test_advantages_all_equal_rewards_are_exactly_zero(estimator):
    reward = np.ones((3, 4), np.float32)
    mask = np.ones((12, 5), bool)
    got = np.asarray(O.compute_advantages(f32(reward), jnp.asarray(mask), ObjectiveConfig(estimator=estimator)))
    assert np.all(got == 0.0)


def _advantages(reward, mask, estimator, eps=1e-6):
    cfg = ObjectiveConfig(estimator=estimator, adv_eps=eps)
    return np.asarray(O.compute_advantages(f32(reward), jnp.asarray(mask), cfg))


@pytest.mark.parametrize("estimator", O.ESTIMATORS)
@pytest.mark.parametrize("G,r", [(15, 2.5), (7, 0.9), (8, 0.1), (5, -3.3), (16, 1e4 / 3)])
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_equal_non_binary_rewards_give_exactly_zero(estimator, G, r, eps):
    """The float32 mean of G copies of r can be 1 ulp off r; GRPO used to divide that by
    (std ~ 1e-8) + 1e-6 (G=15, r=2.5 gave -0.191 for every rollout). A float64 reference says 0."""
    reward = np.full((2, G), r, np.float32)
    reward[1] = np.float32(r) * 2  # a second equal group
    mask = np.ones((2 * G, 3), bool)
    assert np.all(ref_advantages(reward, np.full(2 * G, 3), 3, estimator) == 0.0)
    got = _advantages(reward, mask, estimator, eps)
    assert np.all(got == 0.0), got[:, 0]


# G from a few sizes (1, even, odd, the largest): each new shape compiles, and the float edge cases are in r.
@settings(max_examples=40, deadline=None)
@given(r=st.floats(-1e6, 1e6, width=32), G=st.sampled_from([1, 2, 7, 15, 16]), estimator=st.sampled_from(O.ESTIMATORS))
def test_equal_groups_are_exactly_zero_property(r, G, estimator):
    got = _advantages(np.full((1, G), r, np.float32), np.ones((G, 2), bool), estimator)
    assert np.all(got == 0.0)
    assert not bool(O.zero_variance_groups(f32(np.full((1, G), r)))[0])  # and DAPO drops the group


@pytest.mark.parametrize("estimator", O.ESTIMATORS)
@pytest.mark.parametrize("spread", ["ulps", "1e-7", "1e-5", "mixed"])
def test_near_equal_groups_match_float64_reference(estimator, spread):
    """Groups that differ only in the last bits: float32 result within float32 precision of a
    float64 reference on the same (float32) rewards, relative to the largest advantage."""
    rng = np.random.default_rng(11)
    N, G, T = 6, 7, 5
    base = rng.choice([0.9, 2.5, 0.1, -7.7, 1e3], size=(N, 1))
    if spread == "ulps":
        reward = base.astype(np.float32) + np.spacing(base.astype(np.float32)) * rng.integers(0, 3, size=(N, G))
    elif spread == "mixed":  # near-equal, equal and ordinary groups side by side
        reward = base + rng.normal(size=(N, G)) * np.array([[1e-6], [0], [1], [1e-6], [0], [0.3]]) * np.abs(base)
    else:
        reward = base + rng.normal(size=(N, G)) * float(spread) * np.abs(base)
    reward = reward.astype(np.float32)
    lengths = rng.integers(1, T + 1, size=N * G)
    mask = np.arange(T)[None] < lengths[:, None]
    want = ref_advantages(reward, lengths, T, estimator)
    got = _advantages(reward, mask, estimator)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * max(np.abs(want).max(), 1e-30))
    if estimator != "reinforce_pp":  # its batch whitening shifts equal groups by -m/s, as published
        zero_n = np.all(got.reshape(N, G, T) == 0, axis=(1, 2))
        np.testing.assert_array_equal(zero_n, ~np.asarray(O.zero_variance_groups(f32(reward))))


def test_reinforce_pp_whitening_of_one_shared_value_is_zero():
    """Whitening over tokens that all carry the same centred value (only one row is valid):
    the float32 token mean is off by an ulp, which /(std ~ 0 + eps) used to amplify."""
    cfg_mask = np.zeros((3, 16), bool)
    for reward in ([0.9, 0.1, 0.5], [2.5, 0.3, 0.0], [1.0, 0.0, 0.0]):
        for n_tok in (3, 7, 11, 16):
            mask = cfg_mask.copy()
            mask[0, :n_tok] = True
            got = _advantages(np.asarray([reward], np.float32), mask, "reinforce_pp")
            assert np.all(got == 0.0), (reward, n_tok, got[0, :2])


def test_rloo_is_leave_one_out():
    reward = np.array([[1.0, 0.0, 0.0, 1.0]], np.float32)
    got = np.asarray(O.compute_advantages(f32(reward), jnp.ones((4, 1), bool), ObjectiveConfig(estimator="rloo")))
    np.testing.assert_allclose(got[:, 0], [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3], rtol=1e-6)


# ----------------------------------------------------------------------------- DAPO pieces


def test_overlong_shaping():
    cfg = ObjectiveConfig(overlong_buffer=4, overlong_penalty=0.5)
    length = np.arange(0, 13)
    got = np.asarray(O.overlong_shaping(jnp.asarray(length), 10, cfg))
    want = [0.0 if L <= 6 else -0.5 * min((L - 6) / 4, 1.0) for L in length]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.all(np.asarray(O.overlong_shaping(jnp.asarray(length), 10, ObjectiveConfig())) == 0)
    with pytest.raises(ValueError, match="overlong_buffer"):
        O.overlong_shaping(jnp.asarray(length), 4, cfg)


def test_zero_variance_groups_and_refill():
    reward = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.5, 1]], np.float32)
    keep = np.asarray(O.zero_variance_groups(f32(reward)))
    np.testing.assert_array_equal(keep, [False, True, False, True])
    groups, rows = O.kept_group_rows(keep, 3)
    np.testing.assert_array_equal(groups, [1, 3])
    np.testing.assert_array_equal(rows, [3, 4, 5, 9, 10, 11])
    groups, rows = O.kept_group_rows(keep, 3, max_groups=1)
    np.testing.assert_array_equal(rows, [3, 4, 5])


# ----------------------------------------------------------------------------- policy losses


LOSS_CFGS = [
    ObjectiveConfig(policy_loss="ppo"),
    ObjectiveConfig(policy_loss="ppo", clip_high=0.28, dual_clip=3.0),
    ObjectiveConfig(policy_loss="gspo", clip_low=0.05, clip_high=0.08),
    ObjectiveConfig(policy_loss="gspo_token", clip_low=0.05, clip_high=0.08, dual_clip=2.0),
    ObjectiveConfig(policy_loss="cispo", clip_low=1.0, clip_high=0.28),
    ObjectiveConfig(policy_loss="cispo", clip_low=0.1, clip_high=0.1),
    ObjectiveConfig(policy_loss="pg"),
]


@pytest.mark.parametrize("cfg", LOSS_CFGS, ids=lambda c: f"{c.policy_loss}-d{c.dual_clip}-lo{c.clip_low}")
@pytest.mark.parametrize("scale", [0.3, 60.0], ids=["moderate", "extreme"])
def test_policy_loss_matches_reference(cfg, scale):
    rng = np.random.default_rng(0)
    d = make_batch(rng, scale=scale)
    adv = rng.normal(size=d["mask"].shape[0])[:, None] * d["mask"]
    got, clipped = O.policy_loss_bt(f32(d["logp"]), f32(d["old"]), f32(adv), jnp.asarray(d["mask"]), cfg)
    want = ref_token_loss(d["logp"], d["old"], adv, d["lengths"], cfg)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    assert not np.any(np.asarray(clipped)[~d["mask"]])


def test_ppo_gradient_matches_analytic():
    rng = np.random.default_rng(1)
    d = make_batch(rng, scale=0.4)
    adv = rng.normal(size=(d["mask"].shape[0], 1)) * d["mask"]
    cfg = ObjectiveConfig(clip_low=0.2, clip_high=0.28, dual_clip=1.5)
    g = jax.grad(lambda lp: O.policy_loss_bt(lp, f32(d["old"]), f32(adv), jnp.asarray(d["mask"]), cfg)[0].sum())(
        f32(d["logp"])
    )
    ratio = np.exp(d["logp"] - d["old"])
    # d(-A rho)/dlogp = -A rho where the unclipped branch is active, else 0.
    active = np.where(adv >= 0, ratio < 1.28, (ratio > 0.8) & (ratio < 1.5))
    want = np.where(d["mask"] & active, -adv * ratio, 0.0)
    np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-6)


def test_gspo_sequence_and_token_variants_have_equal_gradients():
    rng = np.random.default_rng(2)
    d = make_batch(rng, scale=0.05)
    adv = rng.normal(size=(d["mask"].shape[0], 1)) * d["mask"]
    batch = LossBatch(jnp.asarray(d["mask"]), f32(adv), f32(d["old"]), f32(d["ref"]), jnp.zeros_like(d["mask"]))
    counts = counts_of(d["mask"])
    grads = []
    for kind in ("gspo", "gspo_token"):
        cfg = ObjectiveConfig(policy_loss=kind, clip_low=0.02, clip_high=0.03)
        grads.append(jax.grad(lambda lp: O.total_loss(lp, f32(d["ent"]), batch, counts, cfg, None)[0])(f32(d["logp"])))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert np.abs(np.asarray(grads[0])).sum() > 0


def test_cispo_gradient_flows_through_clipped_tokens():
    logp = f32([[-1.0, -1.0]])
    old = f32([[-3.0, -1.0]])  # token 0 has ratio e^2, far above 1 + clip_high
    adv = f32([[1.0, 1.0]])
    mask = jnp.ones((1, 2), bool)
    cfg = ObjectiveConfig(policy_loss="cispo", clip_low=1.0, clip_high=0.28)
    g = jax.grad(lambda lp: O.policy_loss_bt(lp, old, adv, mask, cfg)[0].sum())(logp)
    np.testing.assert_allclose(g, [[-1.28, -1.0]], rtol=1e-6)  # PPO would give 0 on token 0


# ----------------------------------------------------------------------------- aggregation and KL


@pytest.mark.parametrize("mode", O.AGGREGATIONS)
@pytest.mark.parametrize("norm_length", [0, 11])
def test_aggregation_matches_reference(mode, norm_length):
    rng = np.random.default_rng(3)
    d = make_batch(rng, lengths=[7, 0, 3, 1, 0, 5, 7, 2, 0, 4, 6, 7])
    got = O.aggregate(f32(d["ent"]), jnp.asarray(d["mask"]), counts_of(d["mask"]), mode, norm_length)
    np.testing.assert_allclose(got, ref_aggregate(d["ent"], d["lengths"], mode, norm_length), rtol=1e-5)


def test_aggregation_of_fully_masked_batch_is_zero():
    mask = np.zeros((4, 3), bool)
    for mode in O.AGGREGATIONS:
        assert float(O.aggregate(jnp.ones((4, 3)), jnp.asarray(mask), counts_of(mask), mode)) == 0.0


@pytest.mark.parametrize("kind", O.KL_KINDS)
def test_kl_matches_reference(kind):
    rng = np.random.default_rng(4)
    d = make_batch(rng, scale=1.0)
    got = O.kl_bt(f32(d["logp"]), f32(d["ref"]), kind)
    np.testing.assert_allclose(got, ref_kl(d["logp"], d["ref"], kind), rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(O.kl_bt(f32(d["logp"]), f32(d["logp"]), kind)) == 0)


def test_k3_under_weighted_tokens_keep_value_and_gradient():
    """Only the overflow side of log(pi_ref/pi) is clamped: a token with log r = -78 has
    k3 = 77 and gradient ~1 (a +-20 clamp gave 19 and no gradient). Reference: float64 on
    the same float32 inputs."""
    clamp = 20.0
    log_r = np.array([-78.0, -30.0, -20.5, -5.0, -1e-3, -1e-5, 0.0, 1e-5, 1e-3, 3.0, 19.5, 25.0, 90.0])
    logp = f32(-np.linspace(0.1, 3.0, log_r.size))
    ref = f32(np.asarray(logp, np.float64) + log_r)
    x = np.minimum(np.asarray(ref, np.float64) - np.asarray(logp, np.float64), clamp)
    want = np.expm1(x) - x  # = pi_ref/pi - 1 - log(pi_ref/pi)
    want_grad = np.where(x < clamp, -np.expm1(x), 0.0)  # d k3 / d logp; 0 past the overflow guard
    got = np.asarray(O.kl_bt(logp, ref, "k3", clamp), np.float64)
    assert abs(got[0] - 77.0) < 1e-4
    # float32 precision of the terms: expm1(x) - x cancels for small |x|, and x itself is rounded.
    assert np.all(np.abs(got - want) <= 4e-7 * (np.abs(x) * (1 + np.abs(np.expm1(x))) + np.abs(want))), got - want
    grad = np.asarray(jax.grad(lambda lp: O.kl_bt(lp, ref, "k3", clamp).sum())(logp))
    np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-6)
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(grad))


def test_total_loss_matches_reference_sum():
    rng = np.random.default_rng(5)
    d = make_batch(rng)
    adv = ref_advantages(d["reward"], d["lengths"], 7, "grpo")
    echo_mask = d["mask"] & (np.arange(7)[None] < 3) & (np.arange(12) % 3 == 0)[:, None]
    obj = ObjectiveConfig(aggregation="seq-mean-token-mean", kl_coef=0.1, kl_kind="k2", entropy_coef=0.01)
    echo = EchoConfig(coef=0.5)
    batch = LossBatch(jnp.asarray(d["mask"]), f32(adv), f32(d["old"]), f32(d["ref"]), jnp.asarray(echo_mask))
    loss, m = O.total_loss(f32(d["logp"]), f32(d["ent"]), batch, counts_of(d["mask"], echo_mask), obj, echo)
    L = d["lengths"]
    pg = ref_aggregate(ref_token_loss(d["logp"], d["old"], adv, L, obj), L, obj.aggregation)
    kl = ref_aggregate(ref_kl(d["logp"], d["ref"], "k2"), L, obj.aggregation)
    ent = ref_aggregate(d["ent"], L, obj.aggregation)
    clips = [b for b in range(12) if echo_mask[b].any()]
    l_echo = np.mean([-d["logp"][b][echo_mask[b]].mean() for b in clips])
    want = pg + 0.1 * kl - 0.01 * ent + 0.5 * l_echo
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["echo_loss"], l_echo, rtol=1e-5)
    np.testing.assert_allclose(m["kl_ref"], kl, rtol=1e-5)
    r = np.exp(d["logp"] - d["old"])[d["mask"]]  # pi / pi_old on behaviour samples
    np.testing.assert_allclose(m["approx_kl_old"], np.mean(r - 1 - np.log(r)), rtol=1e-4)


def test_garbage_logp_on_padding_does_not_leak():
    mask = jnp.array([[True, True, False]])
    logp = f32([[-1.0, -2.0, -jnp.inf]])
    bad = jnp.nan
    batch = LossBatch(mask, f32([[1.0, 1.0, 0.0]]), f32([[-1.1, -2.0, bad]]), f32([[-1.0, -2.5, bad]]), mask)
    counts = counts_of(np.asarray(mask), np.asarray(mask))
    for loss_kind, kl_kind in zip(O.POLICY_LOSSES, itertools.cycle(O.KL_KINDS)):
        obj = ObjectiveConfig(policy_loss=loss_kind, kl_coef=0.1, kl_kind=kl_kind, entropy_coef=0.1)
        loss_fn = lambda lp: O.total_loss(lp, f32([[1.0, 1.0, jnp.nan]]), batch, counts, obj, EchoConfig())[0]
        g = jax.jit(jax.grad(loss_fn))(logp)
        assert np.all(np.isfinite(g)), loss_kind
        assert float(g[0, 2]) == 0.0


# ----------------------------------------------------------------------------- micro-batch invariance


@functools.partial(jax.jit, static_argnames=("obj", "echo"))
def _loss_and_grads(logp, ent, batch, counts, obj, echo):
    (loss, metrics), grads = jax.value_and_grad(O.total_loss, argnums=(0, 1), has_aux=True)(
        logp, ent, batch, counts, obj, echo
    )
    return loss, metrics, grads


@pytest.mark.parametrize(
    "mode,policy_loss",
    list(itertools.product(O.AGGREGATIONS, ["ppo"])) + [("seq-mean-token-mean", "gspo"), ("token-mean", "cispo")],
)
def test_micro_batch_sum_equals_whole_batch(mode, policy_loss):
    rng = np.random.default_rng(6)
    d = make_batch(rng, N=4, G=2, T=6, lengths=[6, 0, 3, 6, 1, 5, 0, 2])
    adv = ref_advantages(d["reward"], d["lengths"], 6, "grpo") + rng.normal(size=(8, 1)) * d["mask"]
    echo_mask = d["mask"] & (np.arange(6)[None] < np.array([4, 0, 2, 6, 0, 0, 0, 2])[:, None])
    obj = ObjectiveConfig(policy_loss=policy_loss, aggregation=mode, kl_coef=0.05, entropy_coef=0.01, dual_clip=3.0)
    echo = EchoConfig(coef=0.3)
    arrays = [d["mask"], adv, d["old"], d["ref"], echo_mask]
    counts = counts_of(d["mask"], echo_mask)  # whole mini-batch
    whole = _loss_and_grads(f32(d["logp"]), f32(d["ent"]), LossBatch(*map(jnp.asarray, arrays)), counts, obj, echo)
    parts = []
    for sl in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):
        mb = LossBatch(*(jnp.asarray(a[sl]) for a in arrays))
        parts.append(_loss_and_grads(f32(d["logp"][sl]), f32(d["ent"][sl]), mb, counts, obj, echo))
    np.testing.assert_allclose(sum(p[0] for p in parts), whole[0], rtol=1e-5, atol=1e-7)
    for key in whole[1]:
        np.testing.assert_allclose(sum(p[1][key] for p in parts), whole[1][key], rtol=1e-5, atol=1e-7, err_msg=key)
    for i in range(2):  # d/dlogp and d/dentropy
        np.testing.assert_allclose(np.concatenate([p[2][i] for p in parts]), whole[2][i], rtol=1e-5, atol=1e-8)
    assert np.abs(np.asarray(whole[2][0])).sum() > 0


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field,value",
    [("estimator", "ppo"), ("policy_loss", "grpo"), ("aggregation", "mean"), ("kl_kind", "k4"), ("dual_clip", 0.5),
     ("clip_low", -0.1), ("norm_length", -1), ("logratio_clamp", 0.0), ("overlong_buffer", -2)],
)
def test_validate_names_field_and_value(field, value):
    with pytest.raises(ValueError) as e:
        ObjectiveConfig(**{field: value}).validate()
    assert field in str(e.value) and repr(value) in str(e.value)
