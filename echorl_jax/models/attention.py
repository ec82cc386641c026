"""Attention: one entry point, ``attention(q, k, v, valid_bk, q_start=, impl=, segment_ids=)``,
backends beside it.

The mask is always the same: query ``i`` (absolute slot ``q_start + i``) may attend key slot
``j`` iff ``j <= q_start + i`` and ``valid_bk[b, j]``. The model calls this for the
full-sequence forward (training, old/ref log-probs, SFT: ``q_start=0``, keys are the
queries) and for the KV-cache steps (prefill into a cache and decode: ``q_start=cache.pos``).

Packed rows (``segment_ids``, full-sequence forward only; rl/packing.py): a row holds several
sequences, segment ``1, 2, ...`` in column order, contiguous, ``0`` = padding. Query ``i`` then
also needs ``segment_ids[b, i] == segment_ids[b, j]``: no token ever sees another sequence.
Every backend takes them: ``xla`` adds the test to its dense mask, ``xla_chunked`` builds each
block's mask from the ids and skips block pairs whose query and key segments cannot meet,
``splash`` takes them as its native segment ids, and ``cudnn`` calls cuDNN's packed
("ragged") layout with per-row segment offsets and lengths (``cudnn_packed_attention``).

Backends (``model.attention``):

* ``xla`` -- the reference: fp32 scores ``[b, g, r, s, k]``, dense mask, softmax.
* ``xla_chunked`` -- flash-style pure JAX: query blocks x key blocks with an online
  softmax and a custom VJP that recomputes each block from the saved log-sum-exp, so
  neither the forward nor the backward holds more than one ``[b, g, r, qb, kb]`` fp32
  block; key blocks wholly above the causal diagonal are skipped (``lax.cond``).
  Runs everywhere; the memory-safe choice.
* ``cudnn`` -- ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bf16 only:
  cuDNN's flash kernels take fp16/bf16), causal + ``key_value_seq_lengths``.
* ``splash`` -- Pallas splash attention (TPU): causal mask + segment ids (``valid`` as 0/1).

Left padding without a dense mask. Training rows are ``[left pad | prompt | response |
right pad]``. ``xla_chunked`` builds each block's mask from ``valid_bk`` (no ``[s, k]``
mask exists); splash takes ``valid`` as segment ids, so real queries see only real keys.
cuDNN only knows a per-row key *length*, so for it the Transformer rolls every row left
by its pad count before the layers (real tokens from column 0, padding only on the right)
and rolls the hidden states back after them -- two gathers per forward, not per layer
(``right_padding_order``). This relies on a row's real tokens being contiguous, which
holds for every caller (RL rows, SFT rows).

What runs where: decode steps (one query against the cache) always run ``xla`` (the
scores are ``[b, n, 1, k]``, small). ``cudnn`` and ``splash`` handle the full-sequence
forward; a multi-token step into a cache (the sampler's prefill, a traced ``q_start``)
runs ``xla_chunked`` for them. Query rows that may attend no key (left padding with
``xla``/``xla_chunked``) produce finite, backend-dependent values; callers mask them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from echorl_jax.models.config import ATTENTION as IMPLS, ModelConfigError

Q_BLOCK = 512  # xla_chunked block sizes: a [b, n, 512, 512] fp32 block is 1 MiB per row and head
K_BLOCK = 512
_NEG = -1e30  # finite mask value: a query row with no allowed key stays NaN-free


class AttentionConfigError(ModelConfigError):
    """``model.attention`` names a backend this process cannot run."""


def resolve(name: str, compute_dtype: str, platform: str | None = None, num_devices: int | None = None) -> str:
    """The backend ``model.attention=name`` runs here; a clear error if it cannot run.

    ``auto``: gpu -> cudnn for bf16 (else xla_chunked); tpu -> splash on one device (else
    xla_chunked: splash is not wrapped in shard_map yet); cpu -> xla.
    """
    platform = platform or jax.default_backend()
    num_devices = jax.device_count() if num_devices is None else num_devices

    def bad(why: str):
        raise AttentionConfigError(f"model.attention={name!r} cannot run here: {why}")

    if name not in IMPLS:
        raise AttentionConfigError(f"model.attention={name!r} is invalid: allowed: {IMPLS}")
    if name == "auto":
        if platform == "gpu":
            return "cudnn" if compute_dtype == "bfloat16" else "xla_chunked"
        if platform == "tpu":
            return "splash" if num_devices == 1 else "xla_chunked"
        return "xla"
    if name == "cudnn":
        if platform != "gpu":
            bad(f"cuDNN flash attention needs a GPU (this process runs on {platform}); use xla or xla_chunked")
        if compute_dtype != "bfloat16":
            bad(f"cuDNN flash attention takes bf16 only (model.compute_dtype={compute_dtype!r}); use xla_chunked")
    if name == "splash":
        if platform != "tpu":
            bad(f"Pallas splash attention needs a TPU (this process runs on {platform}); use xla or xla_chunked")
        if num_devices > 1:
            bad(f"splash is not wrapped in shard_map, so it runs on one device only ({num_devices} here); "
                "use xla_chunked")  # fmt: skip
    return name


def needs_right_padding(impl: str) -> bool:
    """cuDNN masks by key length: the full-sequence forward must see right-padded rows."""
    return impl == "cudnn"


def right_padding_order(valid_bs):
    """``(to_bs, back_bs)`` column indices: ``take_columns(x, to_bs)`` rolls each row left by its
    left-pad count (real tokens from column 0); ``take_columns(y, back_bs)`` undoes it."""
    s = valid_bs.shape[1]
    shift_b = jnp.argmax(valid_bs, axis=1)  # first real token; 0 for a row with none
    cols = jnp.arange(s)[None, :]
    return (cols + shift_b[:, None]) % s, (cols - shift_b[:, None]) % s


def take_columns(x_bs, idx_bs):
    """``x[b, idx[b, j], ...]`` for arrays with any trailing axes."""
    return jnp.take_along_axis(x_bs, idx_bs.reshape(idx_bs.shape + (1,) * (x_bs.ndim - 2)), axis=1)


def attention(q_bsnd, k_bgkd, v_bgkd, valid_bk, *, q_start=0, impl: str = "xla", segment_ids=None):
    """Causal attention with key validity; ``impl`` is a resolved backend (see ``resolve``).

    ``q_start`` is the slot of query 0: the Python int 0 for the full-sequence forward (then
    ``s == k``), the cache position (traced) for cache steps. ``segment_ids`` ``[b, s]`` int32
    (packed rows, full-sequence forward only): attention stays inside a segment.
    """
    s, k = q_bsnd.shape[1], k_bgkd.shape[2]
    full_sequence = isinstance(q_start, int) and q_start == 0 and s == k
    if segment_ids is not None:
        if not full_sequence:
            raise ValueError("segment_ids (packed rows) are for the full-sequence forward, not cache steps")
        return packed_attention(q_bsnd, k_bgkd, v_bgkd, segment_ids, impl=impl)
    if impl == "xla" or s == 1:
        return xla_attention(q_bsnd, k_bgkd, v_bgkd, valid_bk, q_start)
    if impl == "xla_chunked" or not full_sequence:
        return chunked_attention(q_bsnd, k_bgkd, v_bgkd, valid_bk, q_start)
    if impl == "cudnn":
        return cudnn_attention(q_bsnd, k_bgkd, v_bgkd, valid_bk)
    if impl == "splash":
        return splash_attention(q_bsnd, k_bgkd, v_bgkd, valid_bk)
    raise ValueError(f"unknown attention backend {impl!r}; allowed: {IMPLS[1:]}")


def packed_attention(q_bsnd, k_bgkd, v_bgkd, segment_ids_bs, *, impl: str = "xla"):
    """Causal attention inside segments of packed rows (see the module docstring), any backend."""
    valid_bs = segment_ids_bs > 0
    if impl == "xla":
        return xla_attention(q_bsnd, k_bgkd, v_bgkd, valid_bs, segment_ids=segment_ids_bs)
    if impl == "xla_chunked":
        return chunked_attention(q_bsnd, k_bgkd, v_bgkd, valid_bs, segment_ids=segment_ids_bs)
    if impl == "cudnn":
        return cudnn_packed_attention(q_bsnd, k_bgkd, v_bgkd, segment_ids_bs)
    if impl == "splash":
        return splash_attention(q_bsnd, k_bgkd, v_bgkd, valid_bs, segment_ids=segment_ids_bs)
    raise ValueError(f"unknown attention backend {impl!r}; allowed: {IMPLS[1:]}")


def _allowed_bsk(valid_bk, q_start, s: int, segment_ids=None):
    slots = jnp.arange(valid_bk.shape[1])
    allowed = (slots[None, :] <= q_start + jnp.arange(s)[:, None])[None] & valid_bk[:, None, :]
    if segment_ids is not None:  # packed rows: queries and keys are the same s positions
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return allowed


def xla_attention(q_bsnd, k_bgkd, v_bgkd, valid_bk, q_start=0, segment_ids=None):
    """Reference: fp32 scores for every (query, key) pair, dense mask, softmax."""
    b, s, n, d = q_bsnd.shape
    g = k_bgkd.shape[1]
    q = q_bsnd.reshape(b, s, g, n // g, d)
    scores = jnp.einsum("bsgrd,bgkd->bgrsk", q, k_bgkd, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(_allowed_bsk(valid_bk, q_start, s, segment_ids)[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bgkd.dtype)
    out = jnp.einsum("bgrsk,bgkd->bsgrd", probs, v_bgkd)
    return out.reshape(b, s, n, d)


# ---------------------------------------------------------------- xla_chunked (flash-style, pure JAX)


def _pad_axis(x, axis: int, size: int, value=0):
    extra = size - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def chunked_attention(q_bsnd, k_bgkd, v_bgkd, valid_bk, q_start=0, *, q_block: int | None = None,
                      k_block: int | None = None, segment_ids=None):  # fmt: skip
    """Same values as ``xla_attention`` (on rows with an allowed key) in O(qb * kb) score memory.
    Block sizes default to the module's ``Q_BLOCK`` / ``K_BLOCK``; they need not divide s or k.
    ``segment_ids`` (packed rows, ``q_start == 0``): each block's mask also compares segments, and a
    block pair runs only when, in some row, a query segment of the block is among its key segments'."""
    b, s, n, d = q_bsnd.shape
    g, k = k_bgkd.shape[1], k_bgkd.shape[2]
    qb, kb = min(q_block or Q_BLOCK, s), min(k_block or K_BLOCK, k)
    nq, nk = -(-s // qb), -(-k // kb)
    # Block-major layouts: q [nq, b, qb, g, r, d], k/v [nk, b, g, kb, d], valid [nk, b, kb].
    q = _pad_axis(q_bsnd, 1, nq * qb).reshape(b, nq, qb, g, n // g, d).transpose(1, 0, 2, 3, 4, 5)
    kv_blocks = lambda x: _pad_axis(x, 2, nk * kb).reshape(b, g, nk, kb, d).transpose(2, 0, 1, 3, 4)  # noqa: E731
    valid = _pad_axis(valid_bk, 1, nk * kb, False).reshape(b, nk, kb).transpose(1, 0, 2)
    segs = None if segment_ids is None else _segment_blocks(segment_ids, qb, kb, nq, nk)
    # Tie the mask inputs to k: inside the model's layer scan, ``valid``/``q_start`` are loop
    # constants, and jax's scan partial eval would hoist every block's mask out of the loop
    # (one [nq, nk, b, g, r, qb, kb] array -- the memory this backend exists to avoid).
    valid, q_start, segs, k_bgkd = jax.lax.optimization_barrier((valid, jnp.asarray(q_start, jnp.int32), segs, k_bgkd))
    out = _flash(q, kv_blocks(k_bgkd), kv_blocks(v_bgkd), valid, q_start, segs)  # [nq, b, qb, g, r, d]
    return out.transpose(1, 0, 2, 3, 4, 5).reshape(b, nq * qb, n, d)[:, :s]


def _segment_blocks(segment_ids_bs, qb: int, kb: int, nq: int, nk: int):
    """``(seg_q [nq, b, qb], seg_k [nk, b, kb], meet [nq, nk])``: block-major segment ids and whether a
    block pair holds any (query, key) of one segment in some row. Segments increase along a row, so
    that is an overlap of the blocks' segment ranges (padding, id 0, excluded)."""
    b = segment_ids_bs.shape[0]
    big = jnp.iinfo(jnp.int32).max
    seg_q = _pad_axis(segment_ids_bs, 1, nq * qb).reshape(b, nq, qb).transpose(1, 0, 2)
    seg_k = _pad_axis(segment_ids_bs, 1, nk * kb).reshape(b, nk, kb).transpose(1, 0, 2)

    def ranges(x):  # lowest and highest real segment of each block and row; (big, 0) when none
        return jnp.where(x > 0, x, big).min(-1), x.max(-1)

    (q_lo, q_hi), (k_lo, k_hi) = ranges(seg_q), ranges(seg_k)
    meet = (k_hi[None] >= q_lo[:, None]) & (k_lo[None] <= q_hi[:, None])  # [nq, nk, b]
    return seg_q, seg_k, meet.any(-1)


def _block_scores(q_i, k_j, valid_j, q_start, qi, kj, segs=None):
    """Masked fp32 scores of q block ``qi`` against k block ``kj``: ``([b, g, r, qb, kb], allowed)``."""
    qb, kb, d = q_i.shape[1], k_j.shape[2], q_i.shape[-1]
    scores = jnp.einsum("bqgrd,bgkd->bgrqk", q_i, k_j, preferred_element_type=jnp.float32) / math.sqrt(d)
    q_slot = q_start + qi * qb + jnp.arange(qb)
    k_slot = kj * kb + jnp.arange(kb)
    allowed = (k_slot[None, :] <= q_slot[:, None])[None] & valid_j[:, None, :]  # [b, qb, kb]
    if segs is not None:
        seg_q, seg_k, _ = segs
        allowed = allowed & (seg_q[qi][:, :, None] == seg_k[kj][:, None, :])
    allowed = allowed[:, None, None]  # [b, 1, 1, qb, kb]
    return jnp.where(allowed, scores, _NEG), allowed


def _block_live(q_start, qi, kj, qb: int, kb: int, segs=None):
    """False when every key of block kj is after every query of block qi (causally masked), or (packed
    rows) when no query of block qi shares a segment with a key of block kj."""
    live = kj * kb <= q_start + (qi + 1) * qb - 1
    return live if segs is None else live & segs[2][qi, kj]


@jax.custom_vjp
def _flash(q, k, v, valid, q_start, segs):
    return _flash_fwd(q, k, v, valid, q_start, segs)[0]


def _flash_fwd(q, k, v, valid, q_start, segs):
    nq, b, qb, g, r, d = q.shape
    nk, kb = k.shape[0], k.shape[3]

    def q_block(args):
        q_i, qi = args

        def k_step(carry, xs):
            k_j, v_j, valid_j, kj = xs

            def update(carry):
                m, l, acc = carry
                scores, _ = _block_scores(q_i, k_j, valid_j, q_start, qi, kj, segs)
                m_new = jnp.maximum(m, scores.max(-1))
                p = jnp.exp(scores - m_new[..., None])
                alpha = jnp.exp(m - m_new)
                pv = jnp.einsum("bgrqk,bgkd->bgrqd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
                return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

            return jax.lax.cond(_block_live(q_start, qi, kj, qb, kb, segs), update, lambda c: c, carry), None

        init = (jnp.full((b, g, r, qb), _NEG, jnp.float32), jnp.zeros((b, g, r, qb), jnp.float32),
                jnp.zeros((b, g, r, qb, d), jnp.float32))  # fmt: skip
        (m, l, acc), _ = jax.lax.scan(k_step, init, (k, v, valid, jnp.arange(nk)))
        # Unpacked, block 0 is always live, so l >= 1. Packed, a q block of padding only meets no key
        # block (l = 0): its output is 0, and no backward step ever reads its lse.
        some = l > 0
        out = (acc / jnp.where(some, l, 1.0)[..., None]).transpose(0, 3, 1, 2, 4).astype(q.dtype)  # [b, qb, g, r, d]
        return out, jnp.where(some, m + jnp.log(jnp.where(some, l, 1.0)), 0.0)

    out, lse = jax.lax.map(q_block, (q, jnp.arange(nq)))
    return out, (q, k, v, valid, q_start, segs, out, lse)


def _flash_bwd(res, dout):
    q, k, v, valid, q_start, segs, out, lse = res
    nq, b, qb, g, r, d = q.shape
    nk, kb = k.shape[0], k.shape[3]
    scale = 1.0 / math.sqrt(d)
    # D_i = rowsum(dO * O): the softmax-backward correction, [nq, b, g, r, qb].
    delta = jnp.einsum("nbqgrd,nbqgrd->nbgrq", dout.astype(jnp.float32), out.astype(jnp.float32))

    def k_block(dq_acc, xs):
        k_j, v_j, valid_j, kj = xs

        def q_step(carry, qi):
            def update(carry):
                dq_acc, dk_j, dv_j = carry
                q_i, do_i = q[qi], dout[qi]
                scores, allowed = _block_scores(q_i, k_j, valid_j, q_start, qi, kj, segs)
                p = jnp.exp(scores - lse[qi][..., None])
                dv_j = dv_j + jnp.einsum("bgrqk,bqgrd->bgkd", p.astype(do_i.dtype), do_i,
                                         preferred_element_type=jnp.float32)  # fmt: skip
                dp = jnp.einsum("bqgrd,bgkd->bgrqk", do_i, v_j, preferred_element_type=jnp.float32)
                # Masked scores are constants in the reference: no gradient through them.
                ds = jnp.where(allowed, p * (dp - delta[qi][..., None]), 0.0) * scale
                dq_i = jnp.einsum("bgrqk,bgkd->bqgrd", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32)
                dk_j = dk_j + jnp.einsum("bgrqk,bqgrd->bgkd", ds.astype(q_i.dtype), q_i,
                                         preferred_element_type=jnp.float32)  # fmt: skip
                return dq_acc.at[qi].add(dq_i), dk_j, dv_j

            return jax.lax.cond(_block_live(q_start, qi, kj, qb, kb, segs), update, lambda c: c, carry), None

        zeros = jnp.zeros((b, g, kb, d), jnp.float32)
        (dq_acc, dk_j, dv_j), _ = jax.lax.scan(q_step, (dq_acc, zeros, zeros), jnp.arange(nq))
        return dq_acc, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(q.shape, jnp.float32), (k, v, valid, jnp.arange(nk)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------- cuDNN (GPU)


def cudnn_attention(q_bsnd, k_bgkd, v_bgkd, valid_bk, *, implementation: str = "cudnn"):
    """cuDNN flash attention over RIGHT-padded rows (real keys are columns ``[0, len_b)``).

    ``implementation="xla"`` runs jax's own reference of the same call: the CPU tests use it
    to check the layout, lengths and roll logic around the kernel.
    """
    # A row with no real token would give cuDNN an empty softmax; length 1 keeps it finite.
    lengths_b = jnp.maximum(valid_bk.sum(axis=1, dtype=jnp.int32), 1)
    k_bkgd, v_bkgd = k_bgkd.transpose(0, 2, 1, 3), v_bgkd.transpose(0, 2, 1, 3)
    # Only key lengths: a padded query row still sees the row's real keys, so its output is finite.
    return jax.nn.dot_product_attention(q_bsnd, k_bkgd, v_bkgd, is_causal=True, key_value_seq_lengths=lengths_b,
                                        implementation=implementation)  # fmt: skip


# cuDNN's packed ("ragged") layout: up to this many segments per packed row. The packer
# (rl/packing.py) never puts more in one row, whatever the backend.
MAX_SEGMENTS = 64


def segment_offsets(segment_ids_bs, max_segments: int = MAX_SEGMENTS):
    """``(seqlen_bm, offsets_bm1)`` int32: cuDNN's description of packed rows -- segment ``m + 1``'s
    length and first column, ``-1`` for absent segments (and in the extra last offset column).
    Segments are numbered ``1, 2, ...`` in column order and contiguous from column 0 (rl/packing.py)."""
    b = segment_ids_bs.shape[0]
    ones = jnp.ones(segment_ids_bs.shape[1], jnp.int32)
    counts_bm = jax.vmap(lambda seg: jax.ops.segment_sum(ones, seg, num_segments=max_segments + 1))(segment_ids_bs)
    counts_bm = counts_bm[:, 1:]  # id 0 is padding
    starts_bm = jnp.cumsum(counts_bm, axis=1) - counts_bm
    present = counts_bm > 0
    seqlen_bm = jnp.where(present, counts_bm, -1).astype(jnp.int32)
    offsets_bm = jnp.where(present, starts_bm, -1).astype(jnp.int32)
    return seqlen_bm, jnp.concatenate([offsets_bm, jnp.full((b, 1), -1, jnp.int32)], axis=1)


def cudnn_packed_attention(q_bsnd, k_bgkd, v_bgkd, segment_ids_bs, *, implementation: str = "cudnn"):
    """cuDNN flash attention over packed rows: causal inside each segment, nothing across.

    ``jax.nn.dot_product_attention`` takes one key length per row, not segments; jax's cuDNN
    wrapper underneath it (``jax._src.cudnn.fused_attention_stablehlo.dot_product_attention``,
    jax 0.10) takes the packed layout: per-row segment lengths ``[b, M]`` and offsets
    ``[b, M + 1]`` (``segment_offsets``). cuDNN runs it on Hopper or newer GPUs only. That
    wrapper scales the key/value offsets by the *query* head count, so grouped-query k/v are
    repeated to the query heads first (correct for any head layout; k/v memory x heads/kv_heads
    inside attention). Padding rows' outputs are zeroed (cuDNN leaves them unspecified).

    ``implementation="xla"`` runs ``packed_offsets_reference``, this module's reading of what the
    kernel computes from the same lengths and offsets: the CPU tests check the segment description
    and the layout around the kernel with it.
    """
    b, s, n, d = q_bsnd.shape
    g = k_bgkd.shape[1]
    seqlen_bm, offsets_bm1 = segment_offsets(segment_ids_bs)
    k_bsnd = jnp.repeat(k_bgkd.transpose(0, 2, 1, 3), n // g, axis=2)
    v_bsnd = jnp.repeat(v_bgkd.transpose(0, 2, 1, 3), n // g, axis=2)
    if implementation == "xla":
        out = packed_offsets_reference(q_bsnd, k_bsnd, v_bsnd, seqlen_bm, offsets_bm1)
    else:
        from jax._src.cudnn import fused_attention_stablehlo as fa

        try:
            out = fa.dot_product_attention(q_bsnd, k_bsnd, v_bsnd, q_seqlen=seqlen_bm, kv_seqlen=seqlen_bm,
                                           q_offsets=offsets_bm1, kv_offsets=offsets_bm1, scale=1.0 / math.sqrt(d),
                                           mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")  # fmt: skip
        except NotImplementedError as e:  # e.g. a pre-Hopper GPU
            raise AttentionConfigError(
                f"model.attention='cudnn' cannot run packed rows (rl.pack_rows_per_micro_batch > 0) here: {e}; "
                "use model.attention='xla_chunked', or rl.pack_rows_per_micro_batch=0 (padded rows)") from None
    return jnp.where((segment_ids_bs > 0)[:, :, None, None], out, 0).astype(q_bsnd.dtype)


def packed_offsets_reference(q_bsnd, k_bsnd, v_bsnd, seqlen_bm, offsets_bm1):
    """Causal attention inside the segments that ``(seqlen, offsets)`` describe, in plain XLA: token
    ``t`` of row ``b`` is in segment ``m`` iff ``offsets[b, m] <= t < offsets[b, m] + seqlen[b, m]``."""
    b, s, n, d = q_bsnd.shape
    t = jnp.arange(s)
    start, length = offsets_bm1[:, None, :-1], seqlen_bm[:, None, :]
    inside_bsm = (length > 0) & (t[None, :, None] >= start) & (t[None, :, None] < start + length)
    seg_bs = jnp.where(inside_bsm.any(-1), jnp.argmax(inside_bsm, axis=-1) + 1, 0)
    return xla_attention(q_bsnd, k_bsnd.transpose(0, 2, 1, 3), v_bsnd.transpose(0, 2, 1, 3), seg_bs > 0,
                         segment_ids=seg_bs)


# ---------------------------------------------------------------- Pallas splash attention (TPU)


@functools.lru_cache(maxsize=32)
def _splash_kernel(seq: int, heads: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((seq, seq)) for _ in range(heads)])
    names = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute",
             "block_q_dq", "block_kv_dq")  # fmt: skip
    sizes = sa.BlockSizes(**dict.fromkeys(names, block))
    # Concrete mask-info arrays even when first built inside a trace: the kernel is cached, and arrays
    # traced into it would leak into the next program that uses it (e.g. the train step after a log-prob pass).
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash_attention(q_bsnd, k_bgkd, v_bgkd, valid_bk, *, block: int | None = None, interpret: bool = False,
                     segment_ids=None):  # fmt: skip
    """Splash attention: causal mask and segment ids ``valid`` (1 real, 0 padding), or the packed
    rows' ``segment_ids`` (one id per sequence, 0 padding).

    Real queries see only real keys (of their own segment); padding queries see earlier padding keys
    (always at least themselves, so no empty softmax). The sequence is padded to a multiple of the
    block (128 by default, 512 when it divides). ``interpret=True`` runs the kernel in
    Pallas interpret mode (CPU tests).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, s, n, d = q_bsnd.shape
    seq = -(-s // 128) * 128
    block = block or next(x for x in (512, 256, 128) if seq % x == 0)
    seq = -(-seq // block) * block
    seg_bs = _pad_axis((valid_bk if segment_ids is None else segment_ids).astype(jnp.int32), 1, seq)
    q_bnsd = _pad_axis(q_bsnd * (1.0 / math.sqrt(d)), 1, seq).transpose(0, 2, 1, 3)
    k, v = _pad_axis(k_bgkd, 2, seq), _pad_axis(v_bgkd, 2, seq)
    kernel = _splash_kernel(seq, n, block, interpret)
    out = jax.vmap(kernel)(q_bnsd.astype(k.dtype), k, v, segment_ids=sa.SegmentIds(seg_bs, seg_bs))
    return out.transpose(0, 2, 1, 3)[:, :s]
