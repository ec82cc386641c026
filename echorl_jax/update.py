"""The policy update: Optax optimizer, ``train_step(state, batch) -> (state, metrics)``.

One call is one optimizer step on one mini-batch. Inside it, micro-batches are
scanned and their gradients summed; the loss normalisers (token, sequence and
clip counts) are counted once over the whole mini-batch, so accumulation is
exact (see objectives.total_loss).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from echorl_jax import echo as echo_lib
from echorl_jax import objectives
from echorl_jax.models.transformer import logp_and_entropy, positions_from_valid


class TrainState(NamedTuple):
    step: jax.Array  # int32 optimizer steps taken
    params: Any  # nnx.State of the policy's Params
    opt_state: Any


class UpdateBatch(NamedTuple):
    """One mini-batch of rollout rows; ``S = P + T``."""

    tokens_bs: jax.Array  # int32 prompt + response
    valid_bs: jax.Array  # bool real tokens (prompt and response through the stop token)
    mask_bt: jax.Array  # bool response tokens that carry loss
    adv_bt: jax.Array  # f32 advantages
    old_logp_bt: jax.Array  # f32 log pi_old
    ref_logp_bt: jax.Array  # f32 reference log-probs (zeros when KL is off)
    echo_mask_bt: jax.Array  # bool EchoClip tokens
    offpolicy_bt: jax.Array | None = None  # bool expert (off-policy) tokens, LUFFY; None = all on-policy


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    warm = max(opt_cfg.warmup_steps, 0)
    peak = opt_cfg.learning_rate
    if opt_cfg.schedule == "cosine":
        decay = max(total_steps - warm, 1)
        main = optax.cosine_decay_schedule(peak, decay, alpha=opt_cfg.min_lr_ratio)
    else:
        main = optax.constant_schedule(peak)
    if warm == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), main], [warm])


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    chain = []
    if opt_cfg.max_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(opt_cfg.max_grad_norm))
    chain.append(
        optax.adamw(
            make_schedule(opt_cfg, total_steps),
            b1=opt_cfg.b1,
            b2=opt_cfg.b2,
            eps=opt_cfg.eps,
            weight_decay=opt_cfg.weight_decay,
        )
    )
    return optax.chain(*chain)


def response_logp(graphdef, params, tokens_bs, valid_bs, num_response: int, temperature: float):
    """Log-prob and entropy of the last ``T = num_response`` tokens under the policy: ``[B, T]`` each."""
    model = nnx.merge(graphdef, params)
    positions = positions_from_valid(valid_bs)
    # Position s predicts token s+1: the response tokens are predicted by the T positions before them,
    # and only those go through the output layer.
    s = tokens_bs.shape[1]
    logits_bt, _ = model(tokens_bs, positions, valid_bs, logits_slice=(s - num_response - 1, s - 1))
    return logp_and_entropy(logits_bt, tokens_bs[:, s - num_response :], temperature)


def global_counts(batch: UpdateBatch) -> objectives.GlobalCounts:
    return objectives.global_counts(batch.mask_bt, batch.echo_mask_bt, batch.offpolicy_bt)


def split_rows(x: jax.Array, num_chunks: int) -> jax.Array:
    """``[B, ...] -> [C, B/C, ...]``, chunk ``c`` holding rows ``c, c + C, ...``.

    Strided rather than contiguous: rows are sharded over the batch axes in contiguous
    blocks, so every chunk keeps rows on every device and no chunk needs resharding.
    """
    return jnp.swapaxes(x.reshape(-1, num_chunks, *x.shape[1:]), 0, 1)


def merge_rows(x_c: jax.Array) -> jax.Array:
    """Inverse of ``split_rows``."""
    return jnp.swapaxes(x_c, 0, 1).reshape(-1, *x_c.shape[2:])


def make_forward_logp(graphdef, num_response: int, temperature: float, num_chunks: int):
    """Jitted ``(params, tokens_bs, valid_bs) -> logp_bt`` (old / reference log-probs), computed
    ``num_chunks`` row-chunks at a time so its peak memory is that of one micro-batch."""

    def fn(params, tokens_bs, valid_bs):
        def one(chunk):
            return response_logp(graphdef, params, *chunk, num_response, temperature)[0]

        split = (split_rows(tokens_bs, num_chunks), split_rows(valid_bs, num_chunks))
        return merge_rows(jax.lax.map(one, split))

    return jax.jit(fn)


def make_echo_grad_norm(graphdef, echo_cfg: echo_lib.EchoConfig, temperature: float, num_chunks: int = 1):
    """``(params, batch) -> ||grad(coef * L_echo)||``: the echo term's share of the update (a diagnostic;
    it costs one extra forward + backward, so the trainer runs it only every few steps). Gradients are
    accumulated over ``num_chunks`` row-chunks, as in the train step."""

    def echo_term(params, mb: UpdateBatch, num_clips):
        t = mb.mask_bt.shape[1]
        logp, _ = response_logp(graphdef, params, mb.tokens_bs, mb.valid_bs, t, temperature)
        return echo_cfg.coef * echo_lib.echo_loss(logp, mb.echo_mask_bt, num_clips)

    def fn(params, batch: UpdateBatch):
        num_clips = global_counts(batch).num_clips

        def accumulate(grads, mb):
            return jax.tree.map(jnp.add, grads, jax.grad(echo_term)(params, mb, num_clips)), None

        split = jax.tree.map(lambda x: split_rows(x, num_chunks), batch)
        grads, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), split)
        return optax.global_norm(grads)

    return jax.jit(fn)


def make_train_step(graphdef, optimizer, obj_cfg, echo_cfg: echo_lib.EchoConfig, *, micro_batches: int,
                    temperature: float):  # fmt: skip
    """Returns the un-jitted ``train_step(state, batch) -> (state, metrics)``."""

    def loss_fn(params, mb: UpdateBatch, counts):
        t = mb.mask_bt.shape[1]
        logp, entropy = response_logp(graphdef, params, mb.tokens_bs, mb.valid_bs, t, temperature)
        loss_batch = objectives.LossBatch(mb.mask_bt, mb.adv_bt, mb.old_logp_bt, mb.ref_logp_bt, mb.echo_mask_bt,
                                          mb.offpolicy_bt)  # fmt: skip
        return objectives.total_loss(logp, entropy, loss_batch, counts, obj_cfg, echo_cfg)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: UpdateBatch):
        counts = global_counts(batch)
        split = jax.tree.map(lambda x: split_rows(x, micro_batches), batch)

        def accumulate(carry, mb):
            grads, loss, metrics = carry
            (l, m), g = grad_fn(state.params, mb, counts)
            return (jax.tree.map(jnp.add, grads, g), loss + l, jax.tree.map(jnp.add, metrics, m)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first = jax.tree.map(lambda x: x[0], split)
        metric_shape = jax.eval_shape(lambda: grad_fn(state.params, first, counts)[0][1])
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shape)
        init = (zeros, jnp.zeros((), jnp.float32), zero_metrics)
        (grads, loss, metrics), _ = jax.lax.scan(accumulate, init, split)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step
