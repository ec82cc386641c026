"""Sampler/learner mismatch metrics and rollout correction (token TIS, sequence masking) against numpy
references written from verl's formulas, the weight's effect on the loss, a rejected sequence's EchoClip
in the update, config checks, the report."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from echorl_jax import config as config_lib, sharding
from echorl_jax.rl import echo as echo_lib, objectives as O, packing, rollout_correction as rc, update
from echorl_jax.trainer.learner_pass import make_learner_pass
from echorl_jax.trainer.report import summary_rows
from test_packed_update import G, P, T, mesh, model, relative_error, rollout_batch  # noqa: F401  (fixtures)


def batch(seed=0, B=6, T=7, scale=0.4):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[2] = 0  # an empty row
    mask = np.arange(T)[None, :] < lengths[:, None]
    sampler = -rng.uniform(0.01, 5.0, size=(B, T))
    learner = sampler + rng.normal(0, scale, size=(B, T))
    learner[0, 0] = sampler[0, 0] + 3.0  # a ratio of e^3 (> 2)
    learner[1, :] = sampler[1, :] - 1.5  # a whole row far below: geometric mean e^-1.5
    learner[~mask] = -np.inf  # garbage on padding never counts
    sampled = np.ones(B, bool)
    sampled[-1] = False  # an expert row: never measured or corrected
    learner[-1] = sampler[-1] + 10.0
    return learner.astype(np.float32), sampler.astype(np.float32), mask, sampled


def ref_mismatch(learner, sampler, mask, sampled):
    """Loop over rows and tokens, float64."""
    tok_d, seq_d, seq_k3 = [], [], []
    for b in range(mask.shape[0]):
        if not sampled[b] or not mask[b].any():
            continue
        d = [float(learner[b, t]) - float(sampler[b, t]) for t in range(mask.shape[1]) if mask[b, t]]
        tok_d += d
        seq_d.append(sum(d) / len(d))
        seq_k3.append(sum(np.exp(x) - 1 - x for x in d))
    tok_d, seq_d = np.array(tok_d), np.array(seq_d)
    out = lambda x: (x < np.log(0.5)) | (x > np.log(2.0))  # noqa: E731
    return {
        "mismatch/tok_abs_mean": np.abs(tok_d).mean(), "mismatch/tok_abs_max": np.abs(tok_d).max(),
        "mismatch/tok_mean": tok_d.mean(), "mismatch/tok_k3": np.mean(np.exp(tok_d) - 1 - tok_d),
        "mismatch/tok_out_frac": out(tok_d).mean(),
        "mismatch/seq_abs_mean": np.abs(seq_d).mean(), "mismatch/seq_abs_max": np.abs(seq_d).max(),
        "mismatch/seq_k3": np.mean(seq_k3), "mismatch/seq_out_frac": out(seq_d).mean(),
    }  # fmt: skip


def test_mismatch_metrics_match_a_loop_reference():
    learner, sampler, mask, sampled = batch()
    got = jax.jit(rc.mismatch_metrics)(learner, sampler, mask, sampled)
    want = ref_mismatch(learner, sampler, mask, sampled)
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_allclose(float(got[k]), v, rtol=2e-5, atol=1e-6, err_msg=k)
    assert float(got["mismatch/tok_out_frac"]) > 0 and float(got["mismatch/seq_out_frac"]) > 0  # both regimes hit


def test_identical_log_probs_give_zero_mismatch():
    _, sampler, mask, sampled = batch()
    got = rc.mismatch_metrics(sampler, sampler, mask, sampled)
    assert all(float(v) == 0.0 for v in got.values())


def clips_for(mask):
    """An EchoClip (a prefix of the response) on rows 0, 1 and 3; row 1 is the one seq_mask rejects."""
    clip = np.zeros_like(mask)
    for b in (0, 1, 3):
        clip[b, : max(mask[b].sum() - 1, 1)] = True
    return clip & mask


def ref_correction(learner, sampler, mask, sampled, mode, c_tis, c_mask):
    """verl (docs/algo/rollout_corr.md): token weight min(exp(clamp(d, +-20)), C); sequence rejected when
    exp(mean_t d) is outside [1/C, C]. Written per row in float64."""
    B, T = mask.shape
    weight = np.ones((B, T))
    keep = np.ones(B, bool)
    for b in range(B):
        if not sampled[b] or not mask[b].any():
            continue
        d = np.clip(learner[b].astype(np.float64) - sampler[b], -20, 20)
        if "token_tis" in mode:
            weight[b] = np.where(mask[b], np.minimum(np.exp(d), c_tis), 1.0)
        geo = np.exp(d[mask[b]].mean())
        if "seq_mask" in mode and not (1 / c_mask <= geo <= c_mask):
            keep[b] = False
    return weight, keep


@pytest.mark.parametrize("mode", ["token_tis", "seq_mask", "token_tis+seq_mask"])
@pytest.mark.parametrize("c_tis,c_mask", [(2.0, 2.0), (1.2, 1.05)])
def test_correction_matches_numpy_reference(mode, c_tis, c_mask):
    learner, sampler, mask, sampled = batch(seed=1)
    clip = clips_for(mask)
    obj = O.ObjectiveConfig(rollout_correction=mode, rollout_tis_threshold=c_tis,
                            rollout_mask_threshold=c_mask).validate()  # fmt: skip
    got = jax.jit(rc.rollout_correction, static_argnums=5)(learner, sampler, mask, clip, sampled, obj)
    weight, keep = ref_correction(learner, sampler, mask, sampled, mode, c_tis, c_mask)
    if "token_tis" in mode:
        np.testing.assert_allclose(np.asarray(got.weight_bt), weight, rtol=1e-6)
        assert (np.asarray(got.weight_bt)[mask] < c_tis).any() and np.isclose(np.asarray(got.weight_bt).max(), c_tis)
        ratios = np.exp(np.clip(learner.astype(np.float64) - sampler, -20, 20))[mask & sampled[:, None]]
        for name, q in (("p01", 0.01), ("p50", 0.5), ("p99", 0.99)):
            np.testing.assert_allclose(float(got.metrics[f"rollout_corr/ratio_{name}"]), np.quantile(ratios, q),
                                       rtol=1e-5)  # fmt: skip
    else:
        assert got.weight_bt is None
    np.testing.assert_array_equal(np.asarray(got.keep_b), keep)
    # A rejected sequence leaves the loss mask and the EchoClip mask alike.
    np.testing.assert_array_equal(np.asarray(got.mask_bt), mask & keep[:, None])
    np.testing.assert_array_equal(np.asarray(got.echo_mask_bt), clip & keep[:, None])
    if "seq_mask" in mode:
        assert not keep[1] and keep[-1]  # the far row goes, the expert row stays
        assert float(got.metrics["rollout_corr/seq_masked_clips"]) == (clip.any(1) & ~keep).sum() >= 1
    else:
        assert "rollout_corr/seq_masked_clips" not in got.metrics


def test_tis_weight_scales_each_tokens_policy_term():
    """The weight multiplies the on-policy surrogate per token, not the entropy, KL or expert terms: the loss
    with weights equals a numpy sum of w * (PPO surrogate) over tokens, aggregated."""
    learner, sampler, mask, sampled = batch(seed=2)
    rng = np.random.default_rng(3)
    B, T = mask.shape
    logp = (learner + rng.normal(0, 0.1, size=(B, T))).astype(np.float32)
    logp[~mask] = 0.0
    adv = np.where(mask, rng.normal(size=(B, 1)), 0.0).astype(np.float32)
    obj = O.ObjectiveConfig(aggregation="token-mean", entropy_coef=0.01, rollout_correction="token_tis").validate()
    corr = rc.rollout_correction(learner, sampler, mask, np.zeros_like(mask), sampled, obj)
    old = np.where(mask, learner, 0.0).astype(np.float32)
    lb = O.LossBatch(jnp.asarray(mask), jnp.asarray(adv), jnp.asarray(old), jnp.zeros((B, T)), jnp.zeros((B, T), bool),
                     None, corr.weight_bt)  # fmt: skip
    ent = rng.uniform(0, 2, size=(B, T)).astype(np.float32)
    counts = O.global_counts(jnp.asarray(mask), lb.echo_mask_bt)
    loss, m = O.total_loss(jnp.asarray(logp), jnp.asarray(ent), lb, counts, obj, None)
    w = np.asarray(corr.weight_bt, np.float64)
    r = np.exp(logp.astype(np.float64) - old)
    surr = np.maximum(-adv * r, -adv * np.clip(r, 0.8, 1.2))
    n = mask.sum()
    want_pg = (w * surr)[mask].sum() / n
    np.testing.assert_allclose(float(m["pg_loss"]), want_pg, rtol=1e-5)
    np.testing.assert_allclose(float(loss), want_pg - 0.01 * ent[mask].sum() / n, rtol=1e-5)


@pytest.mark.slow  # two train-step compiles on the mesh, 11 s; CI's slow set runs it
def test_rejected_sequence_leaves_the_echo_term(mesh, model):
    """seq_mask rejects the sequence of one of two EchoClips. Through the learner pass (the masks train()
    builds its UpdateBatch from), the rejected clip is in no part of the update: the echo term's gradient is
    that of the surviving clip alone and echo_loss its mean NLL (both written here from the model's log-probs,
    not rl/echo.py; a clip still counted in num_clips would halve them), the echo grad-norm diagnostic agrees
    with the train step, and the packed step leaves the rejected row out (with a KL term too)."""
    b, coef, temp = 2 * G, 0.5, 0.9
    kept_row, rejected_row = 0, G  # rollout_batch gives each group an EchoClip on its first row
    rb = rollout_batch(b, "long", seed=3)
    clip = np.asarray(rb.echo_mask_bt)
    assert clip[kept_row].any() and clip[rejected_row].any() and clip.any(1).sum() == 2
    cfg = config_lib.build_config({"objective": {"rollout_correction": "seq_mask", "aggregation": "token-mean"},
                                   "rl": {"recompute_logp": True}})  # fmt: skip
    far = np.where(np.arange(b)[:, None] == rejected_row, -1.5, 0.0)  # geometric-mean ratio e^-1.5 < 1/2
    learner_logp = np.where(rb.mask_bt, rb.old_logp_bt + far, 0).astype(np.float32)
    ro = types.SimpleNamespace(tokens=rb.tokens_bs, valid=rb.valid_bs, response_mask=rb.mask_bt,
                               behaviour_logp=rb.old_logp_bt)  # fmt: skip
    forward = lambda params, tokens, valid: jnp.asarray(learner_logp)  # noqa: E731
    learner = make_learner_pass(cfg, forward)(1, None, ro, np.ones(b, bool), clip)
    assert float(learner.metrics["rollout_corr/seq_masked_clips"]) == 1
    # All-success groups (advantage 0): the echo term is the update's only gradient.
    full = update.UpdateBatch(rb.tokens_bs, rb.valid_bs, learner.mask_bt, np.zeros(rb.adv_bt.shape, np.float32),
                              learner.old_logp_bt, np.zeros_like(learner_logp), learner.echo_mask_bt)  # fmt: skip
    sharded = sharding.shard_batch(full, mesh)
    graphdef, params = nnx.split(model)
    echo = echo_lib.EchoConfig(coef=coef)

    # Reference: the surviving clip alone, from the model's log-probs of its row.
    c = clip[kept_row : kept_row + 1]

    def clip_nll(p):
        logp = update.response_logp(graphdef, p, rb.tokens_bs[kept_row : kept_row + 1],
                                    rb.valid_bs[kept_row : kept_row + 1], T, temp)[0]  # fmt: skip
        return -(logp * c).sum() / c.sum()

    want_nll, want_grad = jax.jit(jax.value_and_grad(clip_nll))(params)
    want_grad = jax.tree.map(lambda g: coef * np.asarray(g), want_grad)

    opt = optax.sgd(1.0)  # lr 1: the update is minus the gradient
    state = update.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
    padded = jax.jit(update.make_train_step(graphdef, opt, cfg.objective, echo, micro_batches=1, temperature=temp))
    s_pad, m_pad = padded(state, sharded)
    np.testing.assert_allclose(float(m_pad["echo_loss"]), float(want_nll), rtol=1e-5)
    for p0, p1, g in zip(jax.tree.leaves(params), jax.tree.leaves(s_pad.params), jax.tree.leaves(want_grad)):
        assert relative_error(np.asarray(p0) - np.asarray(p1), g) < 1e-5
    want_norm = float(optax.global_norm(want_grad))
    assert want_norm > 0
    np.testing.assert_allclose(float(m_pad["grad_norm"]), want_norm, rtol=1e-5)
    echo_norm = update.make_echo_grad_norm(graphdef, echo, temp, 2)(params, sharded)
    np.testing.assert_allclose(float(echo_norm), want_norm, rtol=1e-5)

    # The packed step computes only the surviving clip's row and gives the same update.
    keep = update.signal_rows(full, cfg.objective)
    np.testing.assert_array_equal(keep, np.arange(b) == kept_row)
    with_kl = O.ObjectiveConfig(kl_coef=0.1).validate()  # every loss token feeds KL: only the rejected row goes
    np.testing.assert_array_equal(update.signal_rows(full, with_kl), np.arange(b) != rejected_row)
    spec = packing.make_spec(b, P + T, T, 1, mesh)
    dest = packing.plan_rows(np.asarray(rb.valid_bs).sum(1), spec, keep_b=keep)
    packed = jax.jit(update.make_train_step(graphdef, opt, cfg.objective, echo, micro_batches=1, temperature=temp,
                                            pack=spec))  # fmt: skip
    s_pk, m_pk = packed(state, sharded, packing.put_plan(dest, mesh))
    np.testing.assert_allclose(float(m_pk["echo_loss"]), float(want_nll), rtol=1e-5)
    for p0, p1, g in zip(jax.tree.leaves(params), jax.tree.leaves(s_pk.params), jax.tree.leaves(want_grad)):
        assert relative_error(np.asarray(p0) - np.asarray(p1), g) < 1e-5


def test_config_validation_names_the_keys():
    with pytest.raises(config_lib.ConfigError, match="objective.rollout_correction='token'"):
        config_lib.build_config({"objective": {"rollout_correction": "token"}, "rl": {"recompute_logp": True}})
    with pytest.raises(config_lib.ConfigError, match="rollout_tis_threshold"):
        config_lib.build_config({"objective": {"rollout_correction": "token_tis", "rollout_tis_threshold": 1.0},
                                 "rl": {"recompute_logp": True}})  # fmt: skip
    with pytest.raises(config_lib.ConfigError, match="needs rl.recompute_logp=true"):
        config_lib.build_config({"objective": {"rollout_correction": "seq_mask"}})
    with pytest.raises(config_lib.ConfigError, match="train.mismatch_every"):
        config_lib.build_config({"train": {"mismatch_every": 2}, "rl": {"recompute_logp": True}})
    with pytest.raises(config_lib.ConfigError, match="train.mismatch_every"):
        config_lib.build_config({"train": {"mismatch_every": -1}})
    cfg = config_lib.build_config({"objective": {"rollout_correction": "token_tis+seq_mask"},
                                   "rl": {"recompute_logp": True}})  # fmt: skip
    assert cfg.objective.rollout_correction == "token_tis+seq_mask"


def test_report_summarises_measured_steps_only():
    train = [{"kind": "train", "step": i + 1, "accuracy": 0.5} for i in range(20)]
    for i in range(1, 20, 2):  # measured every other step
        train[i].update({k: float(i) for k in ("mismatch/tok_abs_mean", "mismatch/tok_abs_max", "mismatch/tok_k3",
                                                "mismatch/tok_out_frac", "mismatch/seq_abs_mean",
                                                "mismatch/seq_abs_max", "mismatch/seq_k3", "mismatch/seq_out_frac")})
    rows = {name: (first, last) for name, first, last in summary_rows(train)}
    assert rows["train mismatch/tok_abs_mean"] == ("1", "19")  # 10 measured steps -> windows of 1
    assert not any("mismatch" in name for name, _, _ in summary_rows(train[::2]))  # never measured: no rows


def _tiny(workdir, train=None, **sections):
    from test_train import tiny_cfg

    return tiny_cfg(workdir, train={"eval_every": 0, "export_hf": False, **(train or {})}, data={"eval": ""},
                    **sections)  # fmt: skip


@pytest.mark.slow  # two 2-step runs (about 2 minutes on 2 shared cores): CI runs it (python -m pytest -q -m slow)
def test_train_logs_mismatch_and_applies_correction(tmp_path):
    """recompute_logp: mismatch/* and rollout_corr/* every step; fp32 sampler and learner agree closely.
    mismatch_every=2 without recompute: measured on step 2 only."""
    from echorl_jax.trainer import train
    from echorl_jax.trainer.metrics_log import read_jsonl

    cfg = _tiny(tmp_path / "a", rl={"recompute_logp": True},
                objective={"rollout_correction": "token_tis+seq_mask"})  # fmt: skip
    train.train(cfg)
    rows = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 2
    for r in rows:
        assert len([k for k in r if k.startswith("mismatch/")]) == 9
        assert {"rollout_corr/tis_mean", "rollout_corr/tis_truncated_frac", "rollout_corr/seq_masked_frac"} <= set(r)
        # fp32 everywhere: the KV-cache decode and the full forward differ only by float rounding.
        assert r["mismatch/tok_abs_max"] < 1e-3 and r["mismatch/tok_out_frac"] == 0
        assert r["rollout_corr/seq_masked_frac"] == 0 and abs(r["rollout_corr/tis_mean"] - 1) < 1e-3
    train.train(_tiny(tmp_path / "b", train={"mismatch_every": 2}))
    rows = [r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert "mismatch/tok_abs_mean" not in rows[0] and "mismatch/tok_abs_mean" in rows[1]
    assert not any(k.startswith("rollout_corr/") for k in rows[1])
