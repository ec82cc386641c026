"""Every learner pass on packed rows equals the padded pass: the train step (loss, metrics, gradients),
the old/reference log-probs, the echo gradient-norm diagnostic, the SFT step, and a whole train() run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from echorl_jax import config as config_lib, sharding
from echorl_jax.models.config import ModelConfig
from echorl_jax.models.transformer import Transformer
from echorl_jax.rl import echo as echo_lib, objectives, packing, update
from echorl_jax.trainer import learn_step, sft, train
from echorl_jax.trainer.metrics_log import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P, T, G = 6, 26, 4
TINY = dict(model_type="llama", vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
            init_std=0.2, attention_bias=False, tie_embeddings=True)  # fmt: skip


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((-1, 1, 1))


@pytest.fixture(scope="module")
def model(mesh):
    return sharding.shard_model(Transformer(ModelConfig(**TINY), rngs=nnx.Rngs(0)), mesh)


def rollout_batch(b, kind, seed=0):
    """An UpdateBatch of left-padded rows: random prompts and responses, LUFFY expert rows (the last of
    each group), one EchoClip per group, reference log-probs."""
    rng = np.random.default_rng(seed)
    plen = rng.integers(1, P + 1, b)
    if kind == "long":  # every row more than half a packed row: one sequence per packed row
        rlen = rng.integers((P + T) // 2 + 1 - P, T + 1, b)
    else:  # long-tailed
        rlen = np.clip(np.exp(rng.normal(np.log(T / 5), 1.0, b)).astype(int), 1, T)
    tokens = rng.integers(1, TINY["vocab_size"], (b, P + T)).astype(np.int32)
    valid = np.zeros((b, P + T), bool)
    for i in range(b):
        valid[i, P - plen[i] : P + rlen[i]] = True
    mask = valid[:, P:].copy()
    adv = np.where(mask, np.repeat(rng.standard_normal(b // G), G)[:, None], 0).astype(np.float32)
    logp = lambda: np.where(mask, -3.5 + 0.2 * rng.standard_normal((b, T)), 0).astype(np.float32)  # noqa: E731
    echo = np.zeros((b, T), bool)
    echo[::G] = np.arange(T)[None, :] < rng.integers(1, T, (b // G, 1))
    off = np.zeros((b, T), bool)
    off[G - 1 :: G] = True
    return update.UpdateBatch(tokens, valid, mask, adv, logp(), logp(), echo & mask, off & mask)


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


CASES = {
    "grpo-token-mean-echo": dict(aggregation="token-mean"),
    "gspo-seq-mean-token-mean-luffy-kl": dict(policy_loss="gspo", aggregation="seq-mean-token-mean",
                                              expert_per_group=1, kl_coef=0.1, entropy_coef=0.01),
    "drgrpo-seq-mean-token-sum-norm": dict(estimator="drgrpo", aggregation="seq-mean-token-sum-norm"),
    "luffy-recipe-tis": dict(policy_loss="pg", aggregation="seq-mean-token-sum-norm", norm_length=128, expert_per_group=1,
                             entropy_coef=0.01, entropy_norm_tokens=406, rollout_correction="token_tis"),
}  # fmt: skip


# "long" (one sequence per packed row, the edge case): the slow set; "tail" packs several per row.
@pytest.mark.parametrize("kind", [pytest.param("long", marks=pytest.mark.slow), "tail"])
@pytest.mark.parametrize("name", list(CASES))
def test_train_step_packed_equals_padded(mesh, model, name, kind):
    """One SGD step (lr 1: the update is minus the gradient): loss, every metric, the gradient norm and
    every parameter's gradient, packed (one row per device per micro-batch: 4 micro-batches for 32 rows
    on 8 devices) vs padded (one micro-batch), fp32, relative 1e-5."""
    b = 32
    obj = objectives.ObjectiveConfig(**CASES[name]).validate()
    echo = echo_lib.EchoConfig(enabled=True, coef=0.5)
    batch = rollout_batch(b, kind, seed=len(name))
    if not obj.expert_per_group:
        batch = batch._replace(offpolicy_bt=None)
    if "token_tis" in obj.rollout_correction:  # a per-token weight on the on-policy term, gathered like the rest
        w = np.random.default_rng(7).uniform(0.5, 2.0, batch.mask_bt.shape).astype(np.float32)
        batch = batch._replace(rc_weight_bt=np.where(batch.mask_bt, w, 0).astype(np.float32))
    graphdef, params = nnx.split(model)
    opt = optax.sgd(1.0)
    state = update.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
    spec = packing.make_spec(b, P + T, T, 1, mesh)
    dest = packing.plan_rows(batch.valid_bs.sum(1), spec)
    assert spec.num_micro_batches == 4 and packing.micro_batches_used(dest, spec) >= 2
    sharded = sharding.shard_batch(batch, mesh)
    padded = jax.jit(update.make_train_step(graphdef, opt, obj, echo, micro_batches=1, temperature=0.9))
    packed = jax.jit(update.make_train_step(graphdef, opt, obj, echo, micro_batches=1, temperature=0.9, pack=spec))
    s_pad, m_pad = padded(state, sharded)
    s_pk, m_pk = packed(state, sharded, packing.put_plan(dest, mesh))
    for k in m_pad:
        np.testing.assert_allclose(m_pk[k], m_pad[k], rtol=1e-5, atol=1e-6, err_msg=k)
    before = jax.tree.leaves(params)
    for p0, a, b_ in zip(before, jax.tree.leaves(s_pk.params), jax.tree.leaves(s_pad.params)):
        g_pad, g_pk = np.asarray(p0) - np.asarray(b_), np.asarray(p0) - np.asarray(a)
        assert relative_error(g_pk, g_pad) < 1e-5
    assert float(m_pad["grad_norm"]) > 0
    # Other lengths, other plan: the same compiled program.
    other = rollout_batch(b, "tail" if kind == "long" else "long", seed=99)._replace(offpolicy_bt=batch.offpolicy_bt,
                                                                                   rc_weight_bt=batch.rc_weight_bt)
    dest = packing.plan_rows(other.valid_bs.sum(1), spec)
    packed(state, sharding.shard_batch(other, mesh), packing.put_plan(dest, mesh))
    assert packed._cache_size() == 1


def test_forward_logp_and_echo_grad_norm_packed_equal_padded(mesh, model):
    """The old/reference log-prob pass (back in [B, T]) and the echo diagnostic, whole rollout batch."""
    b = 32
    batch = sharding.shard_batch(rollout_batch(b, "tail", seed=7), mesh)
    graphdef, params = nnx.split(model)
    spec = packing.make_spec(b, P + T, T, 2, mesh)
    plan = packing.put_plan(packing.plan_rows(np.asarray(batch.valid_bs).sum(1), spec), mesh)
    pad = update.make_forward_logp(graphdef, T, 0.9, 2)(params, batch.tokens_bs, batch.valid_bs)
    pk = update.make_forward_logp(graphdef, T, 0.9, 2, spec)(params, batch.tokens_bs, batch.valid_bs, plan)
    mask = np.asarray(batch.mask_bt)
    assert relative_error(np.asarray(pk)[mask], np.asarray(pad)[mask]) < 1e-5
    assert (np.asarray(pk)[~mask] == 0).all()
    echo = echo_lib.EchoConfig(coef=0.5)
    n_pad = update.make_echo_grad_norm(graphdef, echo, 0.9, 2)(params, batch)
    n_pk = update.make_echo_grad_norm(graphdef, echo, 0.9, 2, spec)(params, batch, plan)
    np.testing.assert_allclose(n_pk, n_pad, rtol=1e-5)
    assert float(n_pad) > 0


def test_sft_step_packed_equals_padded(mesh, model):
    b = 16
    batch = rollout_batch(b, "tail", seed=3)
    data = {"tokens_bs": batch.tokens_bs, "valid_bs": batch.valid_bs, "mask_bt": batch.mask_bt}
    graphdef, params = nnx.split(model)
    opt = optax.sgd(1.0)
    spec = packing.make_spec(b, P + T, T, 1, mesh)
    plan = packing.put_plan(packing.plan_rows(batch.valid_bs.sum(1), spec), mesh)
    sharded = sharding.shard_batch(data, mesh)
    p_pad, _, m_pad = jax.jit(sft.make_sft_step(graphdef, opt))(params, opt.init(params), sharded)
    p_pk, _, m_pk = jax.jit(sft.make_sft_step(graphdef, opt, spec))(params, opt.init(params), sharded, plan)
    for k in m_pad:
        np.testing.assert_allclose(m_pk[k], m_pad[k], rtol=1e-5, err_msg=k)
    for p0, a, b_ in zip(jax.tree.leaves(params), jax.tree.leaves(p_pk), jax.tree.leaves(p_pad)):
        assert relative_error(np.asarray(p0) - np.asarray(a), np.asarray(p0) - np.asarray(b_)) < 1e-5


def test_packing_config_is_validated():
    tiny = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny_test.py"))
    with pytest.raises(config_lib.ConfigError, match=r"rl\.micro_batches=2 .*must be 1 with packing"):
        config_lib.build_config(tiny, {"rl": {"pack_rows_per_micro_batch": 2, "micro_batches": 2}})
    with pytest.raises(config_lib.ConfigError, match=r"rl\.pack_rows_per_micro_batch=-1"):
        config_lib.build_config(tiny, {"rl": {"pack_rows_per_micro_batch": -1}})
    # Rows of P + T: any length the rollout rows have fits one.
    cfg = config_lib.build_config(tiny, {"rl": {"pack_rows_per_micro_batch": 1}, "sampling": {"max_new_tokens": 999}})
    assert learn_step.pack_spec(cfg, 16, sharding.make_mesh((-1, 1, 1))).row_len == 8 + 999


def test_default_job_packs():
    from echorl_jax.cli import default_values

    assert config_lib.build_config(default_values()).rl.pack_rows_per_micro_batch == 4


def test_packing_may_change_on_resume():
    """Packing changes no number, so a run may resume with it switched (like mesh or remat)."""
    from echorl_jax.trainer import run_state

    tiny = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny_test.py"))
    saved = config_lib.to_dict(config_lib.build_config(tiny))
    run_state.check_resume(saved, config_lib.to_dict(config_lib.build_config(
        tiny, {"rl": {"pack_rows_per_micro_batch": 2}})), "w", 1)  # fmt: skip
    with pytest.raises(run_state.ResumeMismatch, match="rl.minibatches"):
        run_state.check_resume(saved, config_lib.to_dict(config_lib.build_config(tiny, {"rl": {"minibatches": 2}})),
                               "w", 1)  # fmt: skip


@pytest.mark.slow  # compiles every planned phase: slow set (CI runs it)
def test_planner_compiles_the_packed_step():
    """plan.py compiles the packed train step from abstract shapes: one packed row per device per
    micro-batch holds about half the activations of the padded step's one micro-batch of 2 rows."""
    from echorl_jax import plan

    values = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny_test.py"))
    cfg = config_lib.build_config(values)
    packed = plan.plan(config_lib.build_config(values, {"rl": {"pack_rows_per_micro_batch": 1}}))
    assert packed.packed and packed.micro_batches == 2 and "up to 2 packed" in plan.format_plan(packed)
    # The padded step (one micro-batch of 2 rows per device), compiled the planner's way.
    mesh = sharding.make_mesh(cfg.mesh.shape)
    graphdef, params = plan.abstract_params(plan.model_config(cfg), mesh)
    optimizer = update.make_optimizer(cfg.optim, 10)
    state = update.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh)), params,
                              plan.abstract_opt_state(optimizer, params, mesh))  # fmt: skip
    step = learn_step.jit_train_step(cfg, graphdef, optimizer, 1.0, jax.tree.map(lambda x: x.sharding, state), mesh)
    padded_temp = step.lower(state, *learn_step.abstract_step_inputs(cfg, mesh)).compile().memory_analysis().temp_size_in_bytes
    assert packed.train_temp < 0.75 * padded_temp


def _rows(workdir):
    drop = ("time/", "tokens_per_s", "packing/")
    return [{k: v for k, v in r.items() if not k.startswith(drop)}
            for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]  # fmt: skip


@pytest.mark.slow  # two end-to-end runs: slow set (CI runs it)
def test_train_with_packing_gives_the_unpacked_run(tmp_path):
    """The tiny config, every learner pass packed (SFT warm start, recomputed old log-probs, the KL
    reference pass, the echo diagnostic, 2 minibatches): the same metrics as the padded run."""
    values = config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny_test.py"))
    # A reward the untrained model earns (3 in 4 responses): mixed and all-success groups, so the policy
    # loss and the echo term carry gradient from step 1 (Adam would turn a zero-vs-1e-16 gradient into
    # steps of different sizes).
    hook = tmp_path / "reward.py"
    hook.write_text("def fn(response, ground_truth, **_):\n    return float(len(response) % 4 != 0)\n")
    common = {"sft": {"steps": 3, "batch_size": 16}, "objective": {"kl_coef": 0.05}, "data": {"eval": ""},
              "reward": {"name": "custom", "custom": f"{hook}:fn"},
              "train": {"steps": 2, "echo_grad_norm_every": 1, "export_hf": False}}  # fmt: skip

    def run(name, rl):
        overrides = {**common, "rl": {"recompute_logp": True, "minibatches": 2, **rl},
                     "train": {**common["train"], "workdir": str(tmp_path / name)},
                     "sft": {**common["sft"], "cache_dir": str(tmp_path / name / "warm")}}  # fmt: skip
        return train.train(config_lib.build_config(values, overrides))

    run("padded", {})
    out = run("packed", {"pack_rows_per_micro_batch": 1})  # one row of P + T = 36 tokens per device
    padded, packed = _rows(tmp_path / "padded"), _rows(tmp_path / "packed")
    assert [r["step"] for r in packed] == [r["step"] for r in padded]
    for a, b in zip(packed, padded):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(b[k], str):
                assert a[k] == b[k]
            else:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=f"step {a['step']} {k}")
    trained = [r for r in padded if r["kind"] == "train"]
    assert len(trained) == 2 and all(r["reward/mean"] > 0 and r["echo/num_clips"] > 0 for r in trained)
    rows = [r for r in read_jsonl(tmp_path / "packed" / "metrics.jsonl") if r["kind"] == "train"]
    assert all(1 <= r["packing/micro_batches"] <= 2 and 0 < r["packing/fill"] <= 1 for r in rows)
    assert out["step"] == 2


SKIP_CASES = {
    "grpo-token-mean-echo": dict(aggregation="token-mean"),
    "gspo-seq-mean-token-mean-luffy": dict(policy_loss="gspo", aggregation="seq-mean-token-mean", expert_per_group=1),
    "drgrpo-seq-mean-token-sum-norm": dict(estimator="drgrpo", aggregation="seq-mean-token-sum-norm"),
}


@pytest.mark.parametrize("name", list(SKIP_CASES))
def test_train_step_leaves_out_rows_with_no_gradient(mesh, model, name):
    """Groups whose advantages are all 0 (all correct or all wrong) and hold no EchoClip add nothing to the
    loss: the packed step that leaves them out (``update.signal_rows`` -> ``plan_rows(keep_b=...)``)
    computes fewer micro-batches and gives the padded step's loss, gradient and update over every row;
    its per-token metrics are the padded step's over the rows it computed."""
    b = 32
    obj = objectives.ObjectiveConfig(**SKIP_CASES[name]).validate()
    echo = echo_lib.EchoConfig(enabled=True, coef=0.5)
    batch = rollout_batch(b, "long", seed=5)
    adv = np.asarray(batch.adv_bt).copy()
    adv[G : 3 * G] = 0.0  # groups 1 and 2: degenerate; group 0 keeps its EchoClip row, group 3+ their advantage
    echo_mask = np.asarray(batch.echo_mask_bt).copy()
    echo_mask[G : 3 * G] = False
    batch = batch._replace(adv_bt=adv, echo_mask_bt=echo_mask)
    if not obj.expert_per_group:
        batch = batch._replace(offpolicy_bt=None)
    keep = update.signal_rows(batch, obj)
    expect = np.ones(b, bool)
    expect[G : 3 * G] = False
    if obj.expert_per_group:  # expert rows stay whatever their advantage
        expect[G - 1 : 3 * G : G] = True
    np.testing.assert_array_equal(keep, expect)
    graphdef, params = nnx.split(model)
    opt = optax.sgd(1.0)
    state = update.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
    spec = packing.make_spec(b, P + T, T, 1, mesh)
    lengths = batch.valid_bs.sum(1)
    dest = packing.plan_rows(lengths, spec, keep_b=keep)
    assert (dest[~keep] == packing.skipped_dest(spec)).all()
    assert packing.micro_batches_used(dest, spec) < packing.micro_batches_used(packing.plan_rows(lengths, spec), spec)
    assert packing.plan_stats(dest, lengths, spec)["packing/skipped_rows"] == (~keep).sum()
    padded = jax.jit(update.make_train_step(graphdef, opt, obj, echo, micro_batches=1, temperature=0.9))
    packed = jax.jit(update.make_train_step(graphdef, opt, obj, echo, micro_batches=1, temperature=0.9, pack=spec))
    s_pad, m_pad = padded(state, sharding.shard_batch(batch, mesh))
    s_pk, m_pk = packed(state, sharding.shard_batch(batch, mesh), packing.put_plan(dest, mesh))
    per_token = ("entropy", "clip_frac", "approx_kl_old", "offpolicy_prob")
    for k in m_pad:
        if k not in per_token:
            np.testing.assert_allclose(m_pk[k], m_pad[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for p0, a, b_ in zip(jax.tree.leaves(params), jax.tree.leaves(s_pk.params), jax.tree.leaves(s_pad.params)):
        assert relative_error(np.asarray(p0) - np.asarray(a), np.asarray(p0) - np.asarray(b_)) < 1e-5
    assert float(m_pad["grad_norm"]) > 0
    # The per-token metrics: the padded step's over the computed rows only.
    k1 = keep[:, None]
    kept = batch._replace(mask_bt=batch.mask_bt & k1, echo_mask_bt=batch.echo_mask_bt & k1,
                          offpolicy_bt=None if batch.offpolicy_bt is None else batch.offpolicy_bt & k1)
    _, m_kept = padded(state, sharding.shard_batch(kept, mesh))
    for k in per_token:
        if k in m_pad:
            np.testing.assert_allclose(m_pk[k], m_kept[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_signal_rows_keeps_every_row_under_kl_or_entropy_terms():
    batch = rollout_batch(16, "tail", seed=2)._replace(adv_bt=np.zeros((16, T), np.float32), offpolicy_bt=None)
    batch = batch._replace(echo_mask_bt=np.zeros((16, T), bool))
    assert not update.signal_rows(batch, objectives.ObjectiveConfig().validate()).any()
    for extra in (dict(kl_coef=0.05), dict(entropy_coef=0.01)):
        assert update.signal_rows(batch, objectives.ObjectiveConfig(**extra).validate()).all(), extra
    # A row with no loss token and no EchoClip token (a sequence rollout correction rejected) feeds no term.
    mask = np.asarray(batch.mask_bt).copy()
    mask[3] = False
    for extra in (dict(kl_coef=0.05), dict(entropy_coef=0.01)):
        keep = update.signal_rows(batch._replace(mask_bt=mask), objectives.ObjectiveConfig(**extra).validate())
        np.testing.assert_array_equal(keep, np.arange(16) != 3, err_msg=str(extra))
