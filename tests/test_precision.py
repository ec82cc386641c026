"""Mixed precision (fp32 master weights / fp32 Adam moments) and rematerialisation policies."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echorl_jax.models.config import REMAT, ModelConfig
from echorl_jax.models.transformer import Transformer
from echorl_jax.rl import echo as echo_lib, objectives, update
from tests.test_logprobs import _Optim

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  logits_chunk=5)  # fmt: skip


def _batch(rows=4, prompt=6, response=10, vocab=64, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    s = prompt + response
    tokens = jax.random.randint(k1, (rows, s), 0, vocab)
    valid = jnp.ones((rows, s), bool).at[0, :3].set(False)
    mask = jnp.ones((rows, response), bool).at[1, 7:].set(False)
    adv = jax.random.normal(k2, (rows, response))
    old = -jnp.abs(jax.random.normal(k3, (rows, response)))
    echo = jnp.zeros((rows, response), bool).at[2, :4].set(True)
    return update.UpdateBatch(tokens, valid, mask & valid[:, prompt:], adv, old, jnp.zeros_like(old), echo)


def _loss_and_grads(cfg: ModelConfig, batch):
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

    def loss(params):
        t = batch.mask_bt.shape[1]
        logp, ent = update.response_logp(graphdef, params, batch.tokens_bs, batch.valid_bs, t, 1.0)
        lb = objectives.LossBatch(batch.mask_bt, batch.adv_bt, batch.old_logp_bt, batch.ref_logp_bt, batch.echo_mask_bt)
        counts = update.global_counts(batch)
        return objectives.total_loss(logp, ent, lb, counts, objectives.ObjectiveConfig(), echo_lib.EchoConfig())[0]

    return jax.jit(jax.value_and_grad(loss))(params)


def _moment_dtypes(opt_state) -> set:
    leaves = jax.tree.leaves(opt_state)
    return {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)}


# float32 parameters: the slow set (the bfloat16 case is the one that can go wrong).
@pytest.mark.parametrize("param_dtype", [pytest.param("float32", marks=pytest.mark.slow), "bfloat16"])
def test_adam_moments_are_float32_for_any_param_dtype(param_dtype):
    cfg = dataclasses.replace(CFG, param_dtype=param_dtype, compute_dtype="bfloat16")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    optimizer = update.make_optimizer(_Optim(), 10)
    opt_state = optimizer.init(params)
    assert _moment_dtypes(opt_state) == {jnp.dtype(jnp.float32)}  # mu and nu, for bf16 params too
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(param_dtype)}

    # One train step keeps every dtype: params stay param_dtype, moments fp32.
    step = update.make_train_step(graphdef, optimizer, objectives.ObjectiveConfig(), echo_lib.EchoConfig(),
                                  micro_batches=2, temperature=1.0)  # fmt: skip
    state = update.TrainState(jnp.int32(0), params, opt_state)
    new, metrics = jax.jit(step)(state, _batch())
    assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype(param_dtype)}
    assert _moment_dtypes(new.opt_state) == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_optimizer_updates_are_float32_for_bf16_params():
    # The update is computed in fp32 from fp32 moments; optax.apply_updates rounds it into each bf16 param.
    cfg = dataclasses.replace(CFG, param_dtype="bfloat16", compute_dtype="bfloat16")
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    optimizer = update.make_optimizer(_Optim(), 10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_bf16_compute_loss_matches_fp32_within_bf16_tolerance():
    batch = _batch()
    loss32, g32 = _loss_and_grads(CFG, batch)
    loss16, g16 = _loss_and_grads(dataclasses.replace(CFG, compute_dtype="bfloat16"), batch)  # fp32 master params
    assert {x.dtype for x in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}  # gradients of the fp32 masters
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=2e-2, atol=2e-3)
    flat32, flat16 = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(g)]) for g in (g32, g16))
    cos = jnp.dot(flat32, flat16) / (jnp.linalg.norm(flat32) * jnp.linalg.norm(flat16))
    assert float(cos) > 0.99


@pytest.mark.slow  # a train step compiled per remat policy: slow set (CI runs it)
def test_remat_policies_give_the_same_loss_and_gradients():
    batch = _batch()
    loss, grads = _loss_and_grads(CFG, batch)
    for remat in REMAT[1:]:
        loss_r, grads_r = _loss_and_grads(dataclasses.replace(CFG, remat=remat), batch)
        np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6, err_msg=remat)
        for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=remat)
