"""One-token decode attention that reads only the live part of the KV cache.

The sampler's cache row is ``[prompt | response region]``: ``prompt`` columns of prefilled keys,
then ``ring`` columns the decode steps write one per step (in the slot-refill loop the response
region is a ring every row writes in the same column, so a row's keys form a circular window that
ends at the column written this step). The region is cut into key blocks of ``block`` columns
(``ring`` is a multiple of ``block``).

A decode step attends over the whole prompt and ``blocks`` response blocks, block indices
``(first + j) mod (ring / block)`` for ``j < blocks``: the caller chooses ``blocks`` (a static
bucket, so shapes stay fixed) and ``first`` (traced) so that every key any row may see lies in
them. Everything else in the region is never read. Within what is read, ``valid_bk`` alone masks
(a slot never marks a stale or future column valid). Blocks are combined with an online softmax
(flash-decoding): fp32 running max, normaliser and weighted sum, so the result equals a softmax
over the visible keys up to fp32 rounding.

Shape letters: b rows, g kv heads, r query heads per kv head, d head dim, l layers, k key slots.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_NEG = -1e30  # finite mask value, as models/attention.py: a row with no visible key stays NaN-free


class LiveKeys(NamedTuple):
    """Which cache columns a decode step reads (see the module docstring)."""

    prompt: int  # static: prompt columns [0, prompt), always read
    block: int  # static: columns per response block
    blocks: int  # static: response blocks read
    ring_blocks: int  # static: blocks in the response region (ring / block)
    first: jax.Array | int  # traced: index of the first block read


def decode_attention(q_b1nd, k_lbgkd, v_lbgkd, layer, valid_bk, live: LiveKeys):
    """Attention of one query per row against the live cache columns of layer ``layer``.

    ``k_lbgkd`` / ``v_lbgkd`` are the whole layer-stacked caches (read by dynamic slices, never
    copied whole); ``valid_bk`` [b, k] marks the keys each row may see.
    """
    b, s, n, d = q_b1nd.shape
    if s != 1:
        raise ValueError(f"decode_attention takes one query per row; got {s}")
    g = k_lbgkd.shape[2]
    q_bgrd = q_b1nd.reshape(b, g, n // g, d)

    def scores_of(start, width):
        """Masked fp32 scores [b, g, r, width] and the values of columns [start, start + width)."""
        k = jax.lax.dynamic_slice(k_lbgkd, (layer, 0, 0, start, 0), (1, b, g, width, d))[0]
        v = jax.lax.dynamic_slice(v_lbgkd, (layer, 0, 0, start, 0), (1, b, g, width, d))[0]
        ok_bk = jax.lax.dynamic_slice(valid_bk, (0, start), (b, width))
        scores = jnp.einsum("bgrd,bgkd->bgrk", q_bgrd, k.astype(q_bgrd.dtype), preferred_element_type=jnp.float32)
        return jnp.where(ok_bk[:, None, None, :], scores / math.sqrt(d), _NEG), v

    def weighted(p, v):
        return jnp.einsum("bgrk,bgkd->bgrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    # The prompt columns start the running (max, normaliser, weighted sum).
    scores, v = scores_of(0, live.prompt)
    m = scores.max(-1)
    p = jnp.exp(scores - m[..., None])
    init = (m, p.sum(-1), weighted(p, v))

    def block_step(carry, j):
        m, l, acc = carry
        start = live.prompt + ((live.first + j) % live.ring_blocks) * live.block
        scores, v = scores_of(start, live.block)
        m_new = jnp.maximum(m, scores.max(-1))
        p = jnp.exp(scores - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        return (m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + weighted(p, v)), None

    # Unrolled (``blocks`` is a small static bucket): in a loop, XLA:CPU's bf16 dot upcast of each
    # block became an f32 copy of the whole cache hoisted out of it (seen in the planner's 7B plan).
    (m, l, acc), _ = jax.lax.scan(block_step, init, jnp.arange(live.blocks, dtype=jnp.int32), unroll=True)
    out = acc / l[..., None]
    return out.reshape(b, 1, n, d).astype(q_b1nd.dtype)
