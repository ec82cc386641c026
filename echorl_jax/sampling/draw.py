"""Token drawing: one exact inverse-CDF draw per row, with top-k / top-p restrictions.

Log-probs convention: ``behaviour_logp`` is the log-prob of the sampled token
under softmax(logits / temperature) over the FULL vocabulary and ``entropy`` is
the entropy of that same distribution — exactly what the trainer recomputes
from its own forward. Top-k / top-p only restrict which token is drawn; their
truncation is not folded into the log-prob (the verl / TRL convention), so the
importance ratio is 1 on-policy up to numerics. Greedy decoding reports
log-probs and entropy at temperature 1. Draws are exact inverse-CDF samples
with one uniform per row from the stream fold_in(fold_in(rng, row), step), so
a seed fixes the rollout whatever the mesh.

Shape letters: b rows, v vocab, c candidates (or a chunk of the vocab), j chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from echorl_jax.sampling.config import SamplingConfig


def logp_entropy_of(scaled_bv, tokens_b):
    """Log-prob of ``tokens_b`` and entropy under softmax(scaled_bv), one pass over the vocab."""
    m_b = jnp.max(scaled_bv, axis=-1, keepdims=True)
    e_bv = jnp.exp(scaled_bv - m_b)
    z_b = jnp.sum(e_bv, axis=-1)
    logz_b = m_b[:, 0] + jnp.log(z_b)
    # H = log Z - E_p[x]: avoids materialising log_softmax a second time.
    entropy_b = logz_b - jnp.sum(e_bv * scaled_bv, axis=-1) / z_b
    logp_b = jnp.take_along_axis(scaled_bv, tokens_b[:, None], axis=-1)[:, 0] - logz_b
    return logp_b, entropy_b


def _last_positive(x_bc):
    """Index of the last entry > 0 in each row (0 if none)."""
    c = x_bc.shape[-1]
    return c - 1 - jnp.argmax(x_bc[:, ::-1] > 0, axis=-1)


def inverse_cdf(w_bv, u_b, chunk: int = 256):
    """Draws index i with probability w_i / sum(w), one uniform ``u_b`` in [0, 1) per row.

    Two-level inverse CDF: pick a chunk of ``chunk`` entries from the chunk sums,
    then an entry inside it. One pass over the vocab (the chunk sums) and one
    random number per row, instead of a Gumbel draw per vocab entry. Rounding
    can push the target past the last mass; the clamps then pick the last
    entry with positive weight, so a zero-weight entry is never returned.
    """
    b, v = w_bv.shape
    c = min(chunk, v)
    nc = -(-v // c)
    w_bjc = jnp.pad(w_bv, ((0, 0), (0, nc * c - v))).reshape(b, nc, c)
    sum_bj = jnp.sum(w_bjc, axis=-1)
    cum_bj = jnp.cumsum(sum_bj, axis=-1)
    x_b = u_b * cum_bj[:, -1]
    j_b = jnp.minimum(jnp.sum(cum_bj <= x_b[:, None], axis=-1), _last_positive(sum_bj))
    w_bc = jnp.take_along_axis(w_bjc, j_b[:, None, None], axis=1)[:, 0]
    x_b = x_b - jnp.take_along_axis(cum_bj - sum_bj, j_b[:, None], axis=-1)[:, 0]
    cum_bc = jnp.cumsum(w_bc, axis=-1)
    i_b = jnp.minimum(jnp.sum(cum_bc <= x_b[:, None], axis=-1), _last_positive(w_bc))
    return (j_b * c + i_b).astype(jnp.int32)


TOP_P_CANDIDATES = 1024  # top-p alone: the nucleus is looked for among this many top tokens first


def _top_k(x_bv, k: int):
    """``lax.top_k`` kept a TopK op: without the barrier, XLA:CPU turned top-k followed by the
    draw's gather into a full sort of the vocabulary (47 ms vs 1.1 ms at [64, 4096], bench/README.md)."""
    return jax.lax.optimization_barrier(jax.lax.top_k(x_bv, k))


def _truncated_draw(cand_bc, ids_bc, u_b, top_p: float, total_b=None):
    """Inverse-CDF draw among descending candidates, cut to the nucleus when ``top_p < 1``.

    ``total_b``: the full vocabulary's mass relative to the top candidate (default: the
    candidates' own), so a nucleus taken among the top candidates equals the full one.
    """
    w_bc = jnp.exp(cand_bc - cand_bc[:, :1])
    if top_p < 1.0:
        total_b = jnp.sum(w_bc, axis=-1) if total_b is None else total_b
        above_bc = jnp.cumsum(w_bc, axis=-1) - w_bc  # mass strictly above each candidate
        w_bc = jnp.where(above_bc < top_p * total_b[:, None], w_bc, 0.0)  # the top one is always kept
    choice_b = inverse_cdf(w_bc, u_b)
    return jnp.take_along_axis(ids_bc, choice_b[:, None], axis=-1)[:, 0]


def _nucleus_draw(scaled_bv, u_b, top_p: float, candidates: int):
    """Top-p draw without sorting the vocabulary in the common case.

    ``lax.top_k`` picks the ``candidates`` most likely tokens. When, in every row, their
    mass reaches ``top_p`` of the total, the nucleus lies inside them and the draw is the
    same as over the sorted vocabulary (``lax.top_k`` orders ties by index, like the
    stable sort). Otherwise (a very flat distribution in some row) the batch falls back
    to the full sort, so the result is exact either way.
    """
    v = scaled_bv.shape[-1]
    iota = lambda: jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), scaled_bv.shape)  # noqa: E731
    if candidates >= v:
        neg_bv, ids_bv = jax.lax.sort_key_val(-scaled_bv, iota(), dimension=-1)
        return _truncated_draw(-neg_bv, ids_bv, u_b, top_p)
    cand_bc, ids_bc = _top_k(scaled_bv, candidates)
    total_b = jnp.sum(jnp.exp(scaled_bv - cand_bc[:, :1]), axis=-1)
    covered = jnp.all(jnp.sum(jnp.exp(cand_bc - cand_bc[:, :1]), axis=-1) >= top_p * total_b)

    def full_sort():
        neg_bv, ids_bv = jax.lax.sort_key_val(-scaled_bv, iota(), dimension=-1)
        return _truncated_draw(-neg_bv, ids_bv, u_b, top_p, total_b)

    return jax.lax.cond(covered, lambda: _truncated_draw(cand_bc, ids_bc, u_b, top_p, total_b), full_sort)


def choose_tokens(logits_bv, keys_b, cfg: SamplingConfig, top_p_candidates: int = TOP_P_CANDIDATES):
    """Next token per row plus its (full-distribution) log-prob and entropy.

    ``keys_b`` holds one PRNG key per row. The draw is an exact inverse-CDF
    sample from softmax(logits / temperature), restricted first to the top-k
    tokens and then to the nucleus (HF / vLLM order), renormalised. Neither
    restriction sorts the vocabulary: top-k is ``lax.top_k``; top-p alone
    searches the top ``top_p_candidates`` first (``_nucleus_draw``).
    """
    logits_bv = logits_bv.astype(jnp.float32)  # a no-op: the model's logits are fp32 already
    if cfg.greedy:
        tokens_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
        return (tokens_b, *logp_entropy_of(logits_bv, tokens_b))
    scaled_bv = logits_bv / cfg.temperature if cfg.temperature != 1.0 else logits_bv
    u_b = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_b)
    v = scaled_bv.shape[-1]
    top_k = cfg.top_k if 0 < cfg.top_k < v else 0
    if not top_k and cfg.top_p >= 1.0:
        m_b = jnp.max(scaled_bv, axis=-1, keepdims=True)
        tokens_b = inverse_cdf(jnp.exp(scaled_bv - m_b), u_b)  # XLA shares this exp with logp_entropy_of
        return (tokens_b, *logp_entropy_of(scaled_bv, tokens_b))
    if top_k:
        cand_bc, ids_bc = _top_k(scaled_bv, top_k)  # sorted descending
        tokens_b = _truncated_draw(cand_bc, ids_bc, u_b, cfg.top_p)
    else:
        tokens_b = _nucleus_draw(scaled_bv, u_b, cfg.top_p, top_p_candidates)
    return (tokens_b, *logp_entropy_of(scaled_bv, tokens_b))
