"""LoRA adapters (models/lora.py): the adapted forward, adapter-only gradients, sharding, config, base identity.

References are independent of the code under test: the merged weights ``W + s·A·B`` are built in numpy,
and the adapter gradients are the full model's gradient (of the same RL loss, through the real train
step) projected in numpy with ``dL/dA = s·(dL/dW)·Bᵀ``, ``dL/dB = s·Aᵀ·(dL/dW)``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from echorl_jax import config as config_lib, sharding
from echorl_jax.models import lora
from echorl_jax.models.config import ModelConfig
from echorl_jax.models.transformer import Transformer, positions_from_valid
from echorl_jax.rl import echo as echo_lib, objectives, update

CFG = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, init_std=0.2)  # fmt: skip
LORA = lora.LoraConfig(rank=3, alpha=6.0)  # scale 2


def adapted_model(seed=0, mesh=None, cfg=CFG, lcfg=LORA):
    """A model with adapters whose B are random too (at init B = 0 and the adapters do nothing)."""
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    if mesh is not None:
        sharding.shard_model(model, mesh)
    lora.add_adapters(model, lcfg, seed=seed + 1, mesh=mesh)
    for i, t in enumerate(lcfg.targets):
        var = getattr(model, lora.b_name(lora.TARGETS[t][0]))
        noise = 0.3 * jax.random.normal(jax.random.key(100 + i), var.get_value().shape)
        var.set_value(jax.device_put(noise.astype(var.get_value().dtype), var.get_value().sharding))
    return model


def numpy_merged(model) -> dict[str, np.ndarray]:
    """Base params with each adapted ``W [L, *in, *out]`` replaced by ``W + s·A·B`` (numpy, per layer)."""
    params = {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam))).items()}
    for weight, _, _ in lora.TARGETS.values():
        if hasattr(model, lora.a_name(weight)):
            a = np.asarray(getattr(model, lora.a_name(weight))[...], np.float64)
            b = np.asarray(getattr(model, lora.b_name(weight))[...], np.float64)
            w = params[weight]
            l, r = a.shape[0], a.shape[-1]
            ab = np.einsum("lir,lro->lio", a.reshape(l, -1, r), b.reshape(l, r, -1)).reshape(w.shape)
            params[weight] = (w + model.lora_scale * ab).astype(w.dtype)
    return params


def plain_model(params: dict) -> Transformer:
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.State(jax.tree.map(jnp.asarray, params)))
    return model


def batch(rows=4, p=5, t=6, seed=0) -> update.UpdateBatch:
    rng = np.random.default_rng(seed)
    s = p + t
    tokens = rng.integers(0, CFG.vocab_size, (rows, s), dtype=np.int32)
    valid = np.ones((rows, s), bool)
    valid[0, :2] = False  # a left-padded prompt
    mask = np.ones((rows, t), bool)
    mask[1, 4:] = False
    valid[1, p + 4 :] = False
    return update.UpdateBatch(
        jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(mask), jnp.asarray(rng.normal(size=(rows, t)), jnp.float32),
        jnp.asarray(-2.0 + 0.1 * rng.normal(size=(rows, t)), jnp.float32), jnp.zeros((rows, t), jnp.float32),
        jnp.asarray(rng.random((rows, t)) < 0.3),
    )  # fmt: skip


def test_adapted_forward_equals_the_merged_weights():
    model = adapted_model()
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, CFG.vocab_size)
    valid = jnp.ones((3, 9), bool).at[0, :3].set(False)
    pos = positions_from_valid(valid)
    got, _ = model(tokens, pos, valid)
    want, _ = plain_model(numpy_merged(model))(tokens, pos, valid)
    base, _ = Transformer(CFG, rngs=nnx.Rngs(0))(tokens, pos, valid)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(base)).max() > 0.1  # the adapters do change the function


def test_fresh_adapters_leave_the_model_unchanged_and_follow_peft_init():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, CFG.vocab_size)
    valid, pos = jnp.ones((2, 7), bool), jnp.broadcast_to(jnp.arange(7), (2, 7))
    before, _ = model(tokens, pos, valid)
    lora.add_adapters(model, LORA, seed=3)
    after, _ = model(tokens, pos, valid)
    np.testing.assert_array_equal(before, after)  # B = 0
    a = np.asarray(model.lora_a_wo[...])  # [L, n, d, r]: fan-in n*d = 32
    assert a.shape == (2, 4, 8, 3) and np.abs(a).max() <= 1 / math.sqrt(32) and a.std() > 0.05
    assert model.lora_b_w_down[...].shape == (2, 3, 32) and not np.asarray(model.lora_b_w_down[...]).any()


def _sgd_delta(graphdef, params, mb, frozen=None):
    """One real train step with SGD(lr 1): the update is minus the gradient of the RL loss."""
    obj = objectives.ObjectiveConfig(kl_coef=0.0, entropy_coef=0.01)
    step = update.make_train_step(graphdef, optax.sgd(1.0), obj, echo_lib.EchoConfig(enabled=True, coef=0.1),
                                  micro_batches=2, temperature=1.0)  # fmt: skip
    state = update.TrainState(jnp.zeros((), jnp.int32), params, optax.sgd(1.0).init(params))
    new, metrics = jax.jit(step)(state, mb, None, frozen)  # (state, batch, dest_b, frozen)
    return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), new.params, params), metrics


def test_adapter_gradients_are_the_full_gradient_projected_onto_the_adapters():
    model = adapted_model()
    mb = batch()
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
    delta_ad, metrics_ad = _sgd_delta(graphdef, adapters, mb, frozen)
    # Only adapters are trained: the state (hence gradients and optimizer) holds exactly them.
    assert set(nnx.to_pure_dict(delta_ad)) == {n for w, _, _ in lora.TARGETS.values()
                                               for n in (lora.a_name(w), lora.b_name(w))}  # fmt: skip

    full_graphdef, full_params = nnx.split(plain_model(numpy_merged(model)))
    delta_full, metrics_full = _sgd_delta(full_graphdef, full_params, mb)
    np.testing.assert_allclose(metrics_ad["loss"], metrics_full["loss"], rtol=1e-5)
    grad_w = {k: -v for k, v in nnx.to_pure_dict(delta_full).items()}
    grad_ad = {k: -v for k, v in nnx.to_pure_dict(delta_ad).items()}
    s = model.lora_scale
    for weight, _, _ in lora.TARGETS.values():
        a = np.asarray(getattr(model, lora.a_name(weight))[...], np.float64)
        b = np.asarray(getattr(model, lora.b_name(weight))[...], np.float64)
        l, r = a.shape[0], a.shape[-1]
        g = grad_w[weight].reshape(l, a.size // (l * r), -1)  # dL/dW_eff as [L, in, out]
        want_a = s * np.einsum("lio,lro->lir", g, b.reshape(l, r, -1))
        want_b = s * np.einsum("lir,lio->lro", a.reshape(l, -1, r), g)
        scale = np.abs(want_b).max()
        assert scale > 1e-4  # a real gradient, not zeros compared with zeros
        np.testing.assert_allclose(grad_ad[lora.a_name(weight)].reshape(want_a.shape), want_a, atol=1e-5 * scale,
                                   rtol=1e-4, err_msg=weight)  # fmt: skip
        np.testing.assert_allclose(grad_ad[lora.b_name(weight)].reshape(want_b.shape), want_b, atol=1e-5 * scale,
                                   rtol=1e-4, err_msg=weight)  # fmt: skip


@pytest.mark.slow  # LoRA steps on two meshes: slow set (CI runs it)
def test_adapters_shard_like_their_weights_and_an_8_device_step_matches_one_device():
    mesh = sharding.make_mesh((2, 2, 2))
    model = adapted_model(mesh=mesh)
    spec = lambda name: getattr(model, name).get_value().sharding.spec  # noqa: E731
    assert spec("lora_a_wq") == P(None, "fsdp", None)  # in = embed -> fsdp, rank replicated
    assert spec("lora_b_wq") == P(None, None, "tensor", None)  # out = heads -> tensor
    assert spec("lora_a_wo") == P(None, "tensor", None, None)  # in = (heads, head_dim)
    assert spec("lora_b_wo") == P(None, None, "fsdp")
    assert spec("lora_a_w_down") == P(None, "tensor", None) and spec("lora_b_w_down") == P(None, None, "fsdp")

    mb = batch(rows=8)
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
    on_mesh, _ = _sgd_delta(graphdef, adapters, sharding.shard_batch(mb, mesh), frozen)
    adapters1, frozen1 = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), (adapters, frozen))
    one, _ = _sgd_delta(graphdef, adapters1, mb, frozen1)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5), on_mesh, one)


@pytest.mark.parametrize("key,value,needle", [
    ("rank", -1, "model.lora.rank=-1"),
    ("targets", "q,qkv", "model.lora.targets"),
    ("targets", "q,q", "model.lora.targets"),
    ("dropout", 0.05, "model.lora.dropout=0.05"),
    ("alpha", 0, "model.lora.alpha=0"),
    ("param_dtype", "float16", "model.lora.param_dtype"),
])  # fmt: skip
def test_bad_lora_settings_fail_at_start_up_naming_the_key(key, value, needle):
    overrides = {"model": {"lora": {"rank": 4, key: value} if key != "rank" else {"rank": value}}}
    with pytest.raises(config_lib.ConfigError, match=needle.replace(".", r"\.")):
        config_lib.build_config({}, overrides)


def test_lora_settings_parse_from_the_command_line():
    args = ["--config.model.lora.rank=8", "--config.model.lora.alpha=16", "--config.model.lora.targets=q,v,down"]
    cfg = config_lib.build_config({}, config_lib.parse_overrides(args))
    assert cfg.model.lora == lora.LoraConfig(rank=8, alpha=16.0, targets=("q", "v", "down"))
    assert cfg.model.lora.scale == 2.0 and not config_lib.build_config({}).model.lora.enabled


def test_weights_fingerprint_sees_every_bit_on_any_mesh():
    params = nnx.to_pure_dict(nnx.state(Transformer(CFG, rngs=nnx.Rngs(0))))
    mesh = sharding.make_mesh((1, 4, 2))
    placed = nnx.to_pure_dict(nnx.state(sharding.shard_model(Transformer(CFG, rngs=nnx.Rngs(0)), mesh)))
    fp = lora.weights_fingerprint(params)
    assert lora.weights_fingerprint(placed) == fp
    flipped = dict(params, w_up=params["w_up"].at[1, 7, 3].set(np.nextafter(params["w_up"][1, 7, 3], 1.0)))
    assert lora.weights_fingerprint(flipped) != fp  # one ulp of one weight
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert lora.weights_fingerprint(bf16) not in (fp, lora.weights_fingerprint(jax.tree.map(jnp.zeros_like, bf16)))


@pytest.mark.slow  # four LoRA train steps compiled: slow set (CI runs it)
def test_packed_lora_step_equals_padded_and_skips_a_nonfinite_update():
    """LoRA composes with packed micro-batches: ``train_step(state, batch, dest_b, frozen)`` on packed rows
    gives the padded step's loss and adapter updates (SGD lr 1: minus the gradient), fp32, relative 1e-5;
    and a NaN advantage leaves the adapters and their optimizer state exactly as they were."""
    from echorl_jax.rl import packing

    mesh = sharding.make_mesh((-1, 1, 1))
    model = adapted_model(mesh=mesh)
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
    b, p, t = 16, 5, 6
    mb = batch(rows=b, p=p, t=t, seed=4)
    obj = objectives.ObjectiveConfig(kl_coef=0.0, entropy_coef=0.01)
    echo = echo_lib.EchoConfig(enabled=True, coef=0.1)
    opt = optax.adam(1e-2)
    state = update.TrainState(jnp.zeros((), jnp.int32), adapters, opt.init(adapters))
    spec = packing.make_spec(b, p + t, t, 1, mesh)
    dest = packing.put_plan(packing.plan_rows(np.asarray(mb.valid_bs).sum(1), spec), mesh)
    sgd = optax.sgd(1.0)
    sgd_state = state._replace(opt_state=sgd.init(adapters))
    padded = jax.jit(update.make_train_step(graphdef, sgd, obj, echo, micro_batches=1, temperature=1.0))
    packed = jax.jit(update.make_train_step(graphdef, sgd, obj, echo, micro_batches=1, temperature=1.0, pack=spec))
    sharded = sharding.shard_batch(mb, mesh)
    s_pad, m_pad = padded(sgd_state, sharded, None, frozen)
    s_pk, m_pk = packed(sgd_state, sharded, dest, frozen)
    np.testing.assert_allclose(m_pk["loss"], m_pad["loss"], rtol=1e-5)
    for name, before in nnx.to_pure_dict(adapters).items():
        g_pad = np.asarray(before) - np.asarray(nnx.to_pure_dict(s_pad.params)[name])
        g_pk = np.asarray(before) - np.asarray(nnx.to_pure_dict(s_pk.params)[name])
        assert np.abs(g_pad).max() > 0, name
        np.testing.assert_allclose(g_pk, g_pad, rtol=1e-5, atol=1e-5 * np.abs(g_pad).max(), err_msg=name)

    step = jax.jit(update.make_train_step(graphdef, opt, obj, echo, micro_batches=2, temperature=1.0))
    bad = sharding.shard_batch(mb._replace(adv_bt=mb.adv_bt.at[0, 0].set(jnp.nan)), mesh)
    new, metrics = step(state, bad, None, frozen)
    assert float(metrics["skipped_updates"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, (new.step, new.params, new.opt_state),
                 (state.step, state.params, state.opt_state))  # fmt: skip
    good, metrics = step(state, sharded, None, frozen)
    assert float(metrics["skipped_updates"]) == 0.0 and int(good.step) == 1
