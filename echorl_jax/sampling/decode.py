"""The sampler's two decode loops, each a ``lax.while_loop`` (in bucketed segments) inside the sampler's jit.

The KV cache of a decode row is ``[prompt | response region]``: the P prefilled prompt columns,
then ``ring = round_up(T, block)`` response columns cut into key blocks of ``block`` columns
(``decode_block``). It is allocated once at its full size and updated in place; a decode step
reads the prompt and only the response blocks that can hold a live key
(``models/decode_attention.py``), never the empty or stale rest.

Live extent, in fixed shapes: the number of blocks a step reads is static per *segment*. A
segment is a ``while_loop`` whose body reads ``nb`` blocks (``nb`` from a short ladder of
buckets, ``block_buckets``: 1, 2, 3, 4, 6, 8, 12, 16, ... blocks) and that runs while the live
extent fits them; each bucket compiles one loop body.

``decode_plain`` (one row per rollout): each prompt's prefill cache and last logits are copied
G times (group-major) into the full cache, then [B, 1] decode steps run until every row has
emitted a stop token (or completed a stop sequence), or after T tokens. Every row writes
response token t's key at column P + t, so the live extent is the same for all rows and grows:
the segments run in bucket order, segment ``nb`` while t <= nb·block.

``decode_refill`` (continuous batching, 0 < slots < N·G): all N prompts are prefilled once up
front into a per-prompt cache [N, P]; S decode slots hold rollouts. When a rollout stops (or
reaches T) its slot takes the next pending rollout r = n·G + g at the next iteration: prompt n's
KV is copied into the slot's prompt columns and its first token is drawn from prompt n's prefill
logits. The slot table (rollout id, own step) and the insert step live inside the loop with
fixed shapes; outputs are written per rollout id, so the Rollout contract is unchanged. Draws
use the rollout's stream id (``stream_ids``: the rollout id unless the caller gives row ids) and
its own step, so a rollout's tokens depend on (seed, stream id) only and equal the
one-row-per-rollout loop's. The KV cache is S × (P + ring) instead of N·G × (P + ring)
(``sampling.kv_bytes_per_slot``). The response region is a ring
(below), so a slot's keys are a circular window ending at this iteration's column, as long as
its rollout's step: the segments are re-entered as that extent (the longest live rollout) grows
and shrinks: an outer loop runs the buckets' loops in ascending order, each while the extent
stays within its bucket.

Both are the ``Sampler``'s own traced code, split out for length: they take the
sampler for its config and its per-step helpers (``pick``, ``hist``, sharding
constraints).

Shape letters: b rows (B), n prompts (N), p prompt length (P), t response
length (T), s slots (S), r rollouts, v vocab.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from echorl_jax.models.decode_attention import LiveKeys
from echorl_jax.models.transformer import KVCache
from echorl_jax.sampling.step import DecodeStep
from echorl_jax.sharding import batch_divisor

TARGET_BLOCKS = 16  # decode_block: about this many key blocks over the response region
MIN_BLOCK = 16  # ... of at least this many columns (tiny blocks cost more loop than they save)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def decode_block(t_max: int) -> int:
    """Columns per response key block for responses of ``t_max`` tokens: the smallest power of two
    >= t_max / 16, at least 16 (so the live extent is tracked in ~1/16ths of T)."""
    return max(MIN_BLOCK, 1 << (max(-(-t_max // TARGET_BLOCKS), 1) - 1).bit_length())


def response_columns(t_max: int, block: int) -> int:
    """Cache columns of the response region: T rounded up to whole blocks."""
    return round_up(t_max, block)


def block_buckets(ring_blocks: int) -> list[int]:
    """Static block counts a decode step may read: 1, 2, 3, 4, 6, 8, 12, ... (each at most 1.5x
    the previous, so a step reads at most 1.5x its live blocks) up to all ``ring_blocks``."""
    out, x = [], 1
    while x < ring_blocks:
        out.append(x)
        x = x + 1 if x < 4 else x * 3 // 2 if x & (x - 1) == 0 else x * 4 // 3
    return out + [ring_blocks]


def keep_rows(x, n_keep: int, n_out: int, axis: int = 0):
    """Keeps the first ``n_keep`` rows along ``axis`` and zero-pads to ``n_out``."""
    x = jax.lax.slice_in_dim(x, 0, n_keep, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n_out - n_keep)
    return jnp.pad(x, pad)


class _Loop(NamedTuple):
    """Plain decode state: one row per rollout, response token t written at column t of [B, T]."""

    t: jax.Array  # index of the response token the next iteration draws
    cache: Any
    last_tok_b: jax.Array  # token t-1, fed to the model this iteration
    last_valid_b: jax.Array  # whether token t-1 is real (row not stopped before it)
    done_b: jax.Array  # row has emitted a stop token (or is padding)
    hist_bl: jax.Array  # the row's last L generated tokens (L = longest multi-token stop; 0 if none)
    stop_len_b: jax.Array  # tokens of the stop that ended the row (0 while running)
    tokens_bt: jax.Array
    mask_bt: jax.Array
    logp_bt: jax.Array
    entropy_bt: jax.Array


class _Slots(NamedTuple):
    """Slot-refill decode state: S slots decode, outputs are indexed by rollout id r (rows of [B, T])."""

    cache: Any  # [L, S, g, P+ring, d]: the slot's prompt at [0, P), its response keys in the ring after
    rid_s: jax.Array  # rollout each slot decodes (>= B: idle, nothing left to start)
    step_s: jax.Array  # that rollout's next response index (0: just inserted, logits from the prefill)
    last_tok_s: jax.Array  # its token step-1, fed to the model this iteration
    hist_sl: jax.Array
    stop_len_s: jax.Array
    next_rid: jax.Array  # first rollout not yet started
    steps: jax.Array  # loop iterations so far
    tokens_rt: jax.Array
    mask_rt: jax.Array
    logp_rt: jax.Array
    entropy_rt: jax.Array
    done_r: jax.Array  # rollout ended with a stop
    stop_len_r: jax.Array


class _Decoded(NamedTuple):
    """What both decode loops hand back, per rollout (rows padded to the batch divisor)."""

    tokens_bt: jax.Array
    mask_bt: jax.Array
    logp_bt: jax.Array
    entropy_bt: jax.Array
    done_b: jax.Array
    stop_len_b: jax.Array
    steps: jax.Array  # decode iterations (each draws one token per busy row)


def stream_ids(row_ids_b, b: int, b_pad: int):
    """[b_pad] key stream of each rollout (draws use ``fold_in(fold_in(rng, id), step)``): the caller's
    ``row_ids_b`` [B], or None for the rollout index; padding rows past B (discarded) keep their index."""
    ids_r = jnp.arange(b_pad)
    return ids_r if row_ids_b is None else jnp.concatenate([row_ids_b.astype(ids_r.dtype), ids_r[b:]])


def _full_cache(sampler: DecodeStep, prompt_k, prompt_v, valid_bk, ring: int) -> KVCache:
    """The decode cache at its final size: prompt columns from ``prompt_*`` [L, rows, g, P, d], then
    ``ring`` empty response columns; ``pos`` = P, the first response column."""
    pad = lambda x: sampler.kv_sharded(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, ring), (0, 0))))  # noqa: E731
    p = valid_bk.shape[1]
    return KVCache(pad(prompt_k), pad(prompt_v), sampler.rows_sharded(jnp.pad(valid_bk, ((0, 0), (0, ring)))),
                   jnp.asarray(p, jnp.int32))  # fmt: skip


def decode_plain(sampler: DecodeStep, model, cache, logits_nv, lengths_n, rng, row_ids_b, stop_at_b, b: int,
                 b_pad: int) -> _Decoded:  # fmt: skip
    """One row per rollout: each prompt's cache copied G times; rows share the write column."""
    cfg, g_size, pad_id = sampler.cfg, sampler.group_size, sampler.pad_id
    n, p, t_max = lengths_n.shape[0], cache.valid_bk.shape[1], cfg.max_new_tokens
    block = sampler.block_size()
    ring = response_columns(t_max, block)

    def expand(x, axis=0):  # group-major repeat, rows padded to b_pad
        return keep_rows(jnp.repeat(jax.lax.slice_in_dim(x, 0, n, axis=axis), g_size, axis=axis), b, b_pad, axis)

    # Copying the repeat straight into the padded full-size cache: XLA fuses repeat + pad into one
    # write of the cache (no [B, P] intermediate, no growing copies).
    cache = _full_cache(sampler, expand(cache.k_lbgkd, axis=1), expand(cache.v_lbgkd, axis=1),
                        expand(cache.valid_bk), ring)  # fmt: skip
    logits_bv = sampler.rows_sharded(expand(logits_nv))
    lengths_b = sampler.rows_sharded(expand(lengths_n))

    # Row keys fold in the rollout's stream id (default: its global row index): draws do not depend on the mesh.
    row_keys_b = jax.vmap(jax.random.fold_in, (None, 0))(rng, stream_ids(row_ids_b, b, b_pad))
    pad_row_b = jnp.arange(b_pad) >= b

    def pick(logits_bv, t, done_b, hist_bl, stop_len_b):
        keys_b = jax.vmap(jax.random.fold_in, (0, None))(row_keys_b, t)
        force_b = None if stop_at_b is None else t == stop_at_b - 1
        return sampler.pick(logits_bv, keys_b, done_b, hist_bl, stop_len_b, force_b)

    def write(buf_bt, col_b, t):
        return jax.lax.dynamic_update_slice(buf_bt, col_b[:, None].astype(buf_bt.dtype), (0, t))

    tok0, live0, done0, lp0, ent0, hist0, stop_len0 = pick(logits_bv, 0, pad_row_b, sampler.hist(b_pad),
                                                           jnp.zeros((b_pad,), jnp.int32))  # fmt: skip
    zeros = lambda dt: sampler.rows_sharded(jnp.zeros((b_pad, t_max), dt))  # noqa: E731
    init = _Loop(
        t=jnp.ones((), jnp.int32), cache=cache, last_tok_b=tok0, last_valid_b=live0, done_b=done0,
        hist_bl=hist0, stop_len_b=stop_len0,
        tokens_bt=write(jnp.full((b_pad, t_max), pad_id, jnp.int32), tok0, 0),
        mask_bt=write(zeros(bool), live0, 0),
        logp_bt=write(zeros(jnp.float32), lp0, 0),
        entropy_bt=write(zeros(jnp.float32), ent0, 0),
    )  # fmt: skip

    def body(s: _Loop, blocks: int):
        positions_b1 = (lengths_b + s.t - 1)[:, None]  # token t-1 sits at prompt length + t - 1
        live = LiveKeys(p, block, blocks, ring // block, 0)  # response columns [0, t) lie in blocks [0, blocks)
        logits_b1v, cache = model(s.last_tok_b[:, None], positions_b1, s.last_valid_b[:, None], s.cache, live=live)
        tok_b, live_b, done_b, lp_b, ent_b, hist_bl, stop_len_b = pick(
            logits_b1v[:, 0], s.t, s.done_b, s.hist_bl, s.stop_len_b)
        return _Loop(
            s.t + 1, cache, tok_b, live_b, done_b, hist_bl, stop_len_b,
            write(s.tokens_bt, tok_b, s.t), write(s.mask_bt, live_b, s.t),
            write(s.logp_bt, lp_b, s.t), write(s.entropy_bt, ent_b, s.t),
        )  # fmt: skip

    # Segment `blocks` runs the steps t <= blocks·block (they write response column t - 1), in
    # order; each stops as soon as every row has stopped.
    out = init
    for blocks in block_buckets(ring // block):
        end = min(blocks * block, t_max - 1) + 1
        out = jax.lax.while_loop(lambda s, end=end: (s.t < end) & ~jnp.all(s.done_b),
                                 lambda s, blocks=blocks: body(s, blocks), out)  # fmt: skip
        if end == t_max:
            break
    return _Decoded(out.tokens_bt, out.mask_bt, out.logp_bt, out.entropy_bt, out.done_b, out.stop_len_b, out.t)


def prompt_row(sampler: DecodeStep, prompt_lngpd, n):
    """Prompt ``n``'s prefill KV [L, 1, g, P, d]. With prompts sharded over devices a dynamic slice
    would make XLA all-gather the whole prompt cache onto every device; a masked sum over the
    prompt axis is a local sum plus an all-reduce of one row (exact: every other term is 0)."""
    rows = prompt_lngpd.shape[1]
    if sampler.mesh is None or batch_divisor(sampler.mesh) == 1:
        return jax.lax.dynamic_slice_in_dim(prompt_lngpd, n, 1, axis=1)
    pick_n = (jnp.arange(rows) == n)[None, :, None, None, None]
    return jnp.sum(jnp.where(pick_n, prompt_lngpd, jnp.zeros((), prompt_lngpd.dtype)), axis=1, keepdims=True,
                   dtype=prompt_lngpd.dtype)  # fmt: skip


def refill_extent(steps, step_s, active_s, block: int, ring: int):
    """Response blocks a refill iteration must read: the circular window of the longest live
    rollout's keys (its step count of columns) that ends at this iteration's column ``steps mod
    ring``; at least the current block, at most all."""
    m = jnp.max(jnp.where(active_s, step_s, 0))
    col = steps % ring
    touched = col // block - jnp.floor_divide(col - jnp.maximum(m, 1) + 1, block) + 1
    return jnp.minimum(touched, ring // block)


def decode_refill(sampler: DecodeStep, model, prompt_cache, prompt_valid_np, logits_nv, lengths_n, rng, row_ids_r,
                  stop_at_r, b: int, s_rows: int) -> _Decoded:  # fmt: skip
    """Continuous batching in fixed shapes: ``s_rows`` slots; a slot whose rollout ends takes the
    next pending rollout (ids in group-major order) at the next iteration.

    Inserting rollout r = n·G + g copies prompt n's prefill KV into the slot's P prompt columns
    and clears the rest of its valid row; its first token is drawn from prompt n's prefill
    logits (the slot's forward that iteration feeds a dummy token, marked invalid). The response
    region is a ring: iteration i writes every row's new key into column P + i mod ring (one
    shared column: an in-place dynamic-update-slice; a per-row scatter into the layer-scanned
    cache made XLA copy the whole cache). A rollout lives at most T <= ring iterations, so it
    never overwrites its own keys; ``valid_bk`` masks the rest. Each draw uses the stream
    fold_in(fold_in(rng, id_r), t) with id_r rollout r's stream id (``stream_ids``) and t its own
    step, and each rollout attends over exactly its own prompt and tokens (in ring order: sums may
    differ from the plain loop's in the last bits), so rollouts equal the one-row-per-rollout loop's.
    """
    cfg, g_size, pad_id = sampler.cfg, sampler.group_size, sampler.pad_id
    p, t_max = prompt_valid_np.shape[1], cfg.max_new_tokens
    block = sampler.block_size()
    ring = response_columns(t_max, block)
    ring_blocks = ring // block
    b_pad = round_up(b, 1 if sampler.mesh is None else batch_divisor(sampler.mesh))
    pk_lngpd, pv_lngpd = prompt_cache.k_lbgkd, prompt_cache.v_lbgkd
    streams_r = stream_ids(row_ids_r, b, b_pad)

    def insert(cache, ins_s, rid_s):
        """Copies prompt KV into the slots ``ins_s`` (one dynamic-update-slice per inserted slot)."""
        n_s = jnp.minimum(rid_s, b - 1) // g_size
        fresh_sk = jnp.pad(prompt_valid_np[n_s], ((0, 0), (0, ring)))
        valid_sk = sampler.rows_sharded(jnp.where(ins_s[:, None], fresh_sk, cache.valid_bk))
        order_s = jnp.argsort(~ins_s, stable=True)  # inserted slots first

        def one(j, kv):
            slot = order_s[j]
            start = (0, slot, 0, 0, 0)
            return tuple(jax.lax.dynamic_update_slice(c, prompt_row(sampler, pc, n_s[slot]), start)
                         for c, pc in zip(kv, (pk_lngpd, pv_lngpd)))  # fmt: skip

        k, v = jax.lax.fori_loop(0, jnp.sum(ins_s, dtype=jnp.int32), one, (cache.k_lbgkd, cache.v_lbgkd))
        return cache._replace(k_lbgkd=sampler.kv_sharded(k), v_lbgkd=sampler.kv_sharded(v), valid_bk=valid_sk)

    slots = jnp.arange(s_rows, dtype=jnp.int32)
    kv_shape = (pk_lngpd.shape[0], s_rows, pk_lngpd.shape[2], p, pk_lngpd.shape[4])
    empty = _full_cache(sampler, jnp.zeros(kv_shape, pk_lngpd.dtype), jnp.zeros(kv_shape, pv_lngpd.dtype),
                        jnp.zeros((s_rows, p), bool), ring)  # fmt: skip
    zeros = lambda dt: sampler.rows_sharded(jnp.zeros((b_pad, t_max), dt))  # noqa: E731
    init = _Slots(
        cache=insert(empty, slots < b, slots), rid_s=slots, step_s=jnp.zeros_like(slots),
        last_tok_s=jnp.full_like(slots, pad_id), hist_sl=sampler.hist(s_rows), stop_len_s=jnp.zeros_like(slots),
        next_rid=jnp.asarray(s_rows, jnp.int32), steps=jnp.zeros((), jnp.int32),
        tokens_rt=sampler.rows_sharded(jnp.full((b_pad, t_max), pad_id, jnp.int32)), mask_rt=zeros(bool),
        logp_rt=zeros(jnp.float32), entropy_rt=zeros(jnp.float32),
        done_r=jnp.zeros((b_pad,), bool), stop_len_r=jnp.zeros((b_pad,), jnp.int32),
    )  # fmt: skip

    def body(st: _Slots, blocks: int):
        active_s = st.rid_s < b
        rid_s = jnp.minimum(st.rid_s, b - 1)  # idle slots compute on a real rollout's inputs, then drop them
        n_s = rid_s // g_size
        fresh_s = st.step_s == 0
        feed_s = active_s & ~fresh_s  # feeds a real token this iteration
        positions_s1 = jnp.maximum(lengths_n[n_s] + st.step_s - 1, 0)[:, None]
        col = st.steps % ring
        # The `blocks` blocks that end at this iteration's block hold every live key (refill_extent).
        live = LiveKeys(p, block, blocks, ring_blocks, col // block - blocks + 1 + ring_blocks)
        logits_s1v, cache = model(st.last_tok_s[:, None], positions_s1, feed_s[:, None],
                                  st.cache._replace(pos=p + col), live=live)  # fmt: skip
        logits_sv = jax.lax.cond(jnp.any(fresh_s), lambda: jnp.where(fresh_s[:, None], logits_nv[n_s],
                                                                     logits_s1v[:, 0]),
                                 lambda: logits_s1v[:, 0])  # fmt: skip
        keys_s = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(rng, r), t))(streams_r[rid_s], st.step_s)
        force_s = None if stop_at_r is None else st.step_s == stop_at_r[rid_s] - 1
        tok_s, _, done_s, lp_s, ent_s, hist_sl, stop_len_s = sampler.pick(
            logits_sv, keys_s, ~active_s, st.hist_sl, st.stop_len_s, force_s)

        # Per-rollout outputs: idle slots write out of bounds (dropped).
        at_r = jnp.where(active_s, rid_s, b_pad)

        def put(buf_rt, col_s):
            return buf_rt.at[at_r, st.step_s].set(col_s.astype(buf_rt.dtype), mode="drop")

        finished_s = active_s & (done_s | (st.step_s == t_max - 1))
        end_r = jnp.where(finished_s, rid_s, b_pad)
        # Refill: the k-th finished slot (in slot order) takes rollout next_rid + k; past B it idles.
        new_rid_s = jnp.where(finished_s, st.next_rid + jnp.cumsum(finished_s, dtype=jnp.int32) - 1, st.rid_s)
        cache = insert(cache, finished_s & (new_rid_s < b), new_rid_s)
        return _Slots(
            cache=cache, rid_s=new_rid_s, step_s=jnp.where(finished_s, 0, st.step_s + 1),
            last_tok_s=tok_s, hist_sl=jnp.where(finished_s[:, None], -2, hist_sl),
            stop_len_s=jnp.where(finished_s, 0, stop_len_s),
            next_rid=st.next_rid + jnp.sum(finished_s, dtype=jnp.int32), steps=st.steps + 1,
            tokens_rt=put(st.tokens_rt, tok_s), mask_rt=put(st.mask_rt, active_s),
            logp_rt=put(st.logp_rt, lp_s), entropy_rt=put(st.entropy_rt, ent_s),
            done_r=st.done_r.at[end_r].set(done_s, mode="drop"),
            stop_len_r=st.stop_len_r.at[end_r].set(stop_len_s, mode="drop"),
        )  # fmt: skip

    def busy(st):
        return jnp.any(st.rid_s < b)

    def extent(st):
        return refill_extent(st.steps, st.step_s, st.rid_s < b, block, ring)

    # One loop per bucket of the live extent, each running while the extent stays in (lower, blocks],
    # in ascending order inside an outer loop: a growing extent moves on to the next bucket's loop,
    # a shrinking one (the longest rollout ended) skips the rest and restarts from the smallest.
    # (Loops in sequence, not a lax.switch: a conditional copies its whole operand -- the cache.)
    buckets = block_buckets(ring_blocks)

    def by_bucket(st):
        for blocks, lower in zip(buckets, [0] + buckets[:-1]):
            st = jax.lax.while_loop(lambda s, blocks=blocks, lower=lower: busy(s) & (extent(s) <= blocks)
                                    & (extent(s) > lower), lambda s, blocks=blocks: body(s, blocks), st)  # fmt: skip
        return st

    out = jax.lax.while_loop(busy, by_bucket, init) if len(buckets) > 1 else by_bucket(init)
    return _Decoded(out.tokens_rt, out.mask_rt, out.logp_rt, out.entropy_rt, out.done_r, out.stop_len_r,
                    out.steps)  # fmt: skip
