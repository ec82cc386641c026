"""The policy update: Optax optimizer, ``train_step(state, batch) -> (state, metrics)``.

One call is one optimizer step on one mini-batch. Inside it, micro-batches are
scanned and their gradients summed; the loss normalisers (token, sequence and
clip counts) are counted once over the whole mini-batch, so accumulation is
exact (see objectives.total_loss).

Packed rows (``pack``, rl/packing.py): every pass here also runs on the mini-batch's
sequences packed into fixed-length rows. The step then takes the host's plan
(``dest_b``, one int per rollout row) beside the mini-batch, and each micro-batch is
gathered into the packed layout on device; counts stay global, and the losses reduce
per sequence through the packed batch's ``Segments`` (rl/segments.py).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from echorl_jax import sharding
from echorl_jax.models.logprobs import chunked_logp_entropy
from echorl_jax.models.transformer import positions_from_valid
from echorl_jax.rl import echo as echo_lib, objectives, packing
from echorl_jax.rl.segments import ROWS


class TrainState(NamedTuple):
    step: jax.Array  # int32 optimizer steps taken
    params: Any  # nnx.State of the trained Params: all of them, or only the LoRA adapters (models/lora.py)
    opt_state: Any


def policy_params(params, frozen=None):
    """The policy's whole nnx State: the trained ``params``, plus the ``frozen`` base weights when only
    LoRA adapters train (a merge of two trees: no array is copied)."""
    return params if frozen is None else nnx.merge_state(params, frozen)


class UpdateBatch(NamedTuple):
    """One mini-batch of rollout rows; ``S = P + T``."""

    tokens_bs: jax.Array  # int32 prompt + response
    valid_bs: jax.Array  # bool real tokens (prompt and response through the stop token)
    mask_bt: jax.Array  # bool response tokens that carry loss
    adv_bt: jax.Array  # f32 advantages
    old_logp_bt: jax.Array  # f32 log pi_old
    ref_logp_bt: jax.Array  # f32 reference log-probs (zeros when KL is off)
    echo_mask_bt: jax.Array  # bool EchoClip tokens (inside mask_bt: rollout correction clears both for a sequence)
    offpolicy_bt: jax.Array | None = None  # bool expert (off-policy) tokens, LUFFY; None = all on-policy
    rc_weight_bt: jax.Array | None = None  # f32 rollout-correction weight on the on-policy term; None = no correction


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


def _float32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Runs ``inner`` on float32 views of the gradients and parameters, so its state (Adam's moments: optax
    gives the second moment its params' dtype) is float32 even for bfloat16 parameters. A no-op for float32
    parameters; for bfloat16 ones, ``optax.apply_updates`` rounds the float32 update into each parameter."""

    def update(updates, state, params=None):
        return inner.update(_float32(updates), state, None if params is None else _float32(params))

    return optax.GradientTransformation(lambda params: inner.init(_float32(params)), update)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW (+ global-norm clipping) with float32 moments whatever the parameter dtype."""
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
    return in_float32(optax.chain(*chain))


def opt_state_shardings(optimizer: optax.GradientTransformation, params, mesh):
    """Shardings for ``optimizer.init(params)``: every params-shaped subtree (Adam's moments) on its params'
    shardings, everything else (step counts) replicated. ``jax.jit(optimizer.init)`` alone leaves the moments,
    zeros that depend on no input, on one device, and replicating them costs the full state per device."""
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    params_def = jax.tree.structure(param_sh)
    is_params = lambda x: jax.tree.structure(x) == params_def  # noqa: E731
    return jax.tree.map(lambda sub: param_sh if is_params(sub) else sharding.replicated(mesh),
                        jax.eval_shape(optimizer.init, params), is_leaf=is_params)  # fmt: skip


def init_opt_state(optimizer: optax.GradientTransformation, params, mesh):
    """``optimizer.init(params)`` placed by ``opt_state_shardings`` (moments sharded like their params)."""
    return jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, mesh))(params)


def response_logp(graphdef, params, tokens_bs, valid_bs, num_response: int, temperature: float):
    """Log-prob and entropy of the last ``T = num_response`` tokens under the policy: ``[B, T]`` each."""
    model = nnx.merge(graphdef, params)
    positions = positions_from_valid(valid_bs)
    # Position s predicts token s+1: the response tokens are predicted by the T positions before them,
    # and only those go through the output layer.
    # The output layer then runs model.cfg.logits_chunk positions at a time: no [B, T, V] logits.
    s = tokens_bs.shape[1]
    hidden_bth, _ = model(tokens_bs, positions, valid_bs, logits_slice=(s - num_response - 1, s - 1), return_hidden=True)
    targets_bt = tokens_bs[:, s - num_response :]
    return chunked_logp_entropy(hidden_bth, model.output_head(), targets_bt, temperature, model.cfg.logits_chunk)


def packed_logp(graphdef, params, tokens_bt, index: packing.PackedIndex, temperature: float):
    """``(logp_bt, entropy_bt)`` ``[R, L]`` of packed rows: at each token, the log-prob of that token
    given its sequence so far (0 at column 0, which nothing predicts; a sequence's first token gets a
    value from the previous sequence, which no mask selects: first tokens are prompt)."""
    model = nnx.merge(graphdef, params)
    l = tokens_bt.shape[1]
    hidden_bth, _ = model(tokens_bt, index.position_bt, index.segment_bt > 0, logits_slice=(0, l - 1),
                          return_hidden=True, segment_ids=index.segment_bt)  # fmt: skip
    logp, entropy = chunked_logp_entropy(hidden_bth, model.output_head(), tokens_bt[:, 1:], temperature,
                                         model.cfg.logits_chunk)  # fmt: skip
    return jnp.pad(logp, ((0, 0), (1, 0))), jnp.pad(entropy, ((0, 0), (1, 0)))


def micro_batch_logp(graphdef, params, mb: UpdateBatch, temperature: float, index=None, pack=None):
    """``(logp, entropy, layout)`` of one micro-batch: padded rows (``index`` None; ``[B, T]``, ``ROWS``)
    or a packed micro-batch (``[R, L]``, its ``Segments``)."""
    if index is None:
        t = mb.mask_bt.shape[1]
        return (*response_logp(graphdef, params, mb.tokens_bs, mb.valid_bs, t, temperature), ROWS)
    return (*packed_logp(graphdef, params, mb.tokens_bs, index, temperature), pack.layout(index))


def check_plan(dest_b, pack) -> None:
    if (dest_b is None) != (pack is None):
        raise ValueError("a packed pass (built with pack=PackSpec) takes the plan dest_b, a padded one none; got "
                         f"pack={'set' if pack is not None else None}, dest_b={'set' if dest_b is not None else None}")


def global_counts(batch: UpdateBatch) -> objectives.GlobalCounts:
    return objectives.global_counts(batch.mask_bt, batch.echo_mask_bt, batch.offpolicy_bt)


def placed_rows(batch: UpdateBatch, dest_b, pack: packing.PackSpec) -> UpdateBatch:
    """``batch`` with the masks of the rows the plan ``dest_b`` left out cleared (what counts see)."""
    keep_b1 = (jnp.asarray(dest_b) < packing.skipped_dest(pack))[:, None]
    off = None if batch.offpolicy_bt is None else batch.offpolicy_bt & keep_b1
    return batch._replace(mask_bt=batch.mask_bt & keep_b1, echo_mask_bt=batch.echo_mask_bt & keep_b1, offpolicy_bt=off)


def signal_rows(batch: UpdateBatch, obj_cfg) -> np.ndarray:
    """bool ``[B]`` (host): the rows whose loss terms can have a gradient. Every term reads only a row's
    loss-mask tokens (policy, KL, entropy, expert) or its EchoClip tokens (echo), so a row with neither adds
    exactly 0 to the loss and the gradient: an empty response, or a sequence rollout correction rejected
    (it clears both masks). Without a KL or entropy term, so does a row whose advantage is 0 at every loss
    token (every policy loss here is proportional to the advantage). The packed train step need not compute
    these rows; expert (off-policy) rows are always kept."""
    every_token = obj_cfg.kl_coef > 0 or obj_cfg.entropy_coef != 0  # a term that any loss token feeds
    return np.asarray(sharding.to_host(_signal_rows(batch, every_token)), bool)  # one [B] transfer


@functools.partial(jax.jit, static_argnums=1)
def _signal_rows(batch: UpdateBatch, every_token: bool) -> jax.Array:
    mask_bt = batch.mask_bt.astype(bool)
    keep_b = jnp.any(mask_bt if every_token else (batch.adv_bt != 0) & mask_bt, axis=1)
    keep_b |= jnp.any(batch.echo_mask_bt.astype(bool), axis=1)
    if batch.offpolicy_bt is not None:
        keep_b |= jnp.any(batch.offpolicy_bt.astype(bool), axis=1)
    return keep_b


def split_rows(x: jax.Array, num_chunks: int) -> jax.Array:
    """``[B, ...] -> [C, B/C, ...]``, chunk ``c`` holding rows ``c, c + C, ...``.

    Strided rather than contiguous: rows are sharded over the batch axes in contiguous
    blocks, so every chunk keeps rows on every device and no chunk needs resharding.
    """
    return jnp.swapaxes(x.reshape(-1, num_chunks, *x.shape[1:]), 0, 1)


def merge_rows(x_c: jax.Array) -> jax.Array:
    """Inverse of ``split_rows``."""
    return jnp.swapaxes(x_c, 0, 1).reshape(-1, *x_c.shape[2:])


def keep_sharding(tree, shardings):
    """``tree`` constrained to ``shardings`` (a matching tree; None: left to XLA)."""
    return tree if shardings is None else jax.lax.with_sharding_constraint(tree, shardings)


def zeros_float32(params, shardings=None):
    """Gradient accumulators: float32 whatever the parameter dtype (bf16 sums lose small micro-batch terms);
    with ``shardings`` (the parameters') they stay sharded like the parameters."""
    return keep_sharding(jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params), shardings)


def add_float32(acc, grads, shardings=None):
    return keep_sharding(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads), shardings)


def make_forward_logp(graphdef, num_response: int, temperature: float, num_chunks: int,
                      pack: packing.PackSpec | None = None, mesh=None):  # fmt: skip
    """Jitted ``(params, tokens_bs, valid_bs) -> logp_bt`` (old / reference log-probs), computed
    ``num_chunks`` row-chunks at a time so its peak memory is that of one micro-batch. With ``pack``
    (the whole rollout batch's spec) it takes the plan too, ``(params, tokens_bs, valid_bs, dest_b)``,
    and runs on packed micro-batches. ``mesh``: the mesh it runs on (its activations' rows stay over the
    batch axes, ``sharding.constrain_rows``)."""

    def fn(params, tokens_bs, valid_bs):
        def one(chunk):
            return response_logp(graphdef, params, *chunk, num_response, temperature)[0]

        split = (split_rows(tokens_bs, num_chunks), split_rows(valid_bs, num_chunks))
        return merge_rows(jax.lax.map(one, split))

    def packed_fn(params, tokens_bs, valid_bs, dest_b):
        place = packing.placement(dest_b, valid_bs)
        logp_crl = packing.map_packed(lambda toks, index: packed_logp(graphdef, params, toks, index, temperature)[0],
                                      tokens_bs, place, pack)  # fmt: skip
        return packing.unpack(logp_crl, place, num_response, pack)

    return jax.jit(sharding.traced_on(mesh, fn if pack is None else packed_fn))


def make_echo_grad_norm(graphdef, echo_cfg: echo_lib.EchoConfig, temperature: float, num_chunks: int = 1,
                        pack: packing.PackSpec | None = None, mesh=None, param_sh=None):  # fmt: skip
    """``(params, batch) -> ||grad(coef * L_echo)||``: the echo term's share of the update (a diagnostic;
    it costs one extra forward + backward, so the trainer runs it only every few steps). Gradients are
    accumulated over ``num_chunks`` row-chunks, as in the train step; with ``pack`` over packed
    micro-batches, ``(params, batch, dest_b)``; LoRA: ``(params, batch, dest_b or None, frozen)``. ``param_sh``: the parameters' shardings, which the
    accumulated gradients keep (left to itself XLA may all-reduce them whole onto every device)."""

    def echo_term(params, mb: UpdateBatch, num_clips, index, frozen):
        logp, _, layout = micro_batch_logp(graphdef, policy_params(params, frozen), mb, temperature, index, pack)
        return echo_cfg.coef * echo_lib.echo_loss(logp, mb.echo_mask_bt, num_clips, layout)

    def fn(params, batch: UpdateBatch, dest_b=None, frozen=None):
        check_plan(dest_b, pack)
        num_clips = global_counts(batch).num_clips
        grad = lambda mb, index=None: jax.grad(echo_term)(params, mb, num_clips, index, frozen)  # noqa: E731
        if dest_b is not None:
            add = lambda grads, mb, index: add_float32(grads, grad(mb, index), param_sh)  # noqa: E731
            grads = packing.scan_packed(add, zeros_float32(params, param_sh), batch,
                                        packing.placement(dest_b, batch.valid_bs), pack)  # fmt: skip
            return optax.global_norm(grads)

        def accumulate(grads, mb):
            return add_float32(grads, grad(mb), param_sh), None

        split = jax.tree.map(lambda x: split_rows(x, num_chunks), batch)
        grads, _ = jax.lax.scan(accumulate, zeros_float32(params, param_sh), split)
        return optax.global_norm(grads)

    return jax.jit(sharding.traced_on(mesh, fn))


def skip_nonfinite(old: TrainState, new: TrainState, metrics: dict) -> tuple[TrainState, dict]:
    """``new`` unless the update's loss or gradient norm is NaN/Inf; then ``old`` whole (params, optimizer
    moments, step count: the update is skipped, as if the mini-batch had not been drawn). Adds
    ``skipped_updates`` (1.0 when skipped) to ``metrics``. A select inside the step: no host round-trip."""
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    state = jax.tree.map(lambda a, b: jnp.where(finite, b, a), old, new)
    return state, dict(metrics, skipped_updates=1.0 - finite.astype(jnp.float32))


def make_train_step(graphdef, optimizer, obj_cfg, echo_cfg: echo_lib.EchoConfig, *, micro_batches: int,
                    temperature: float, pack: packing.PackSpec | None = None, param_sh=None):  # fmt: skip
    """Returns the un-jitted ``train_step(state, batch, dest_b=None, frozen=None) -> (state, metrics)``; with
    ``pack`` (the mini-batch's spec) it takes the plan ``dest_b`` and runs on packed micro-batches. ``frozen``:
    the base weights when ``state.params`` holds only LoRA adapters (read, never differentiated or updated).
    An update whose loss or gradient is not finite leaves ``state`` as it was (``skip_nonfinite``).
    ``param_sh``: the (trained) parameters' shardings, kept by the gradient accumulators."""

    def loss_fn(params, mb: UpdateBatch, counts, index, frozen, metric_counts=None):
        logp, entropy, layout = micro_batch_logp(graphdef, policy_params(params, frozen), mb, temperature, index,
                                                 pack)  # fmt: skip
        loss_batch = objectives.LossBatch(mb.mask_bt, mb.adv_bt, mb.old_logp_bt, mb.ref_logp_bt, mb.echo_mask_bt,
                                          mb.offpolicy_bt, mb.rc_weight_bt)  # fmt: skip
        return objectives.total_loss(logp, entropy, loss_batch, counts, obj_cfg, echo_cfg, layout, metric_counts)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: UpdateBatch, dest_b=None, frozen=None):
        check_plan(dest_b, pack)
        counts = global_counts(batch)
        # Packed: rows the plan placed nowhere (no gradient: rl/packing.py, signal_rows) are not computed;
        # the loss keeps the whole mini-batch's counts, the per-token metrics average over the computed rows.
        metric_counts = None if dest_b is None else global_counts(placed_rows(batch, dest_b, pack))

        def accumulate(carry, mb, index=None):
            grads, loss, metrics = carry
            (l, m), g = grad_fn(state.params, mb, counts, index, frozen, metric_counts)
            return (add_float32(grads, g, param_sh), loss + l, jax.tree.map(jnp.add, metrics, m))

        zeros = zeros_float32(state.params, param_sh)
        metric_shape = jax.eval_shape(lambda: grad_fn(state.params, batch, counts, None, frozen)[0][1])  # scalars
        zero_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shape)
        init = (zeros, jnp.zeros((), jnp.float32), zero_metrics)
        if dest_b is None:
            split = jax.tree.map(lambda x: split_rows(x, micro_batches), batch)
            (grads, loss, metrics), _ = jax.lax.scan(lambda c, mb: (accumulate(c, mb), None), init, split)
        else:
            place = packing.placement(dest_b, batch.valid_bs)
            grads, loss, metrics = packing.scan_packed(accumulate, init, batch, place, pack)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        return skip_nonfinite(state, TrainState(state.step + 1, params, opt_state), metrics)

    return train_step
