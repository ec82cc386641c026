"""The sampler's two decode loops, each one ``lax.while_loop`` inside the sampler's jit.

``decode_plain`` (one row per rollout): each prompt's prefill cache and last
logits are repeated G times (group-major), then [B, 1] decode steps run until
every row has emitted a stop token (or completed a stop sequence), or after T
tokens. The loop is split into a few segments whose cache grows to P + T slots:
all rows write the same slot, so early steps need not read (attend over) the
empty tail — on CPU the decode step is dominated by reading the cache.

``decode_refill`` (continuous batching, ``sampling.slots``, 0 < S < N·G): all N
prompts are prefilled once up front into a per-prompt cache [N, P]; S decode
slots hold rollouts. When a rollout stops (or reaches T) its slot takes the next
pending rollout r = n·G + g at the next iteration: prompt n's KV is copied into
the slot's first P cache slots and its first token is drawn from prompt n's
prefill logits. The slot table (rollout id, own step) and the insert step live
inside one ``lax.while_loop`` with fixed shapes; outputs are written per
rollout id, so the Rollout contract is unchanged. Draws use the stream of the
rollout id and the rollout's own step, so a rollout's tokens depend on (seed,
rollout id) only and equal the one-row-per-rollout loop's. The KV cache is
S × (P + T) instead of N·G × (P + T) (``sampling.kv_bytes_per_slot``); no
segments (slots are at different steps): every step reads the whole cache, masked.

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

from echorl_jax.models.transformer import init_cache
from echorl_jax.sampling.step import DecodeStep
from echorl_jax.sharding import batch_divisor


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


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

    cache: Any  # [L, S, g, P+T, d]: the slot's prompt at [0, P), response token i at P + i
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


def decode_plain(sampler: DecodeStep, model, cache, logits_nv, lengths_n, rng, stop_at_b, b: int, b_pad: int) -> _Decoded:
    """One row per rollout: repeat each prompt's cache G times; rows share the write slot."""
    cfg, g_size, pad_id, mcfg = sampler.cfg, sampler.group_size, sampler.pad_id, model.cfg
    n, p, t_max = lengths_n.shape[0], cache.valid_bk.shape[1], cfg.max_new_tokens

    def expand(x, axis=0):  # group-major repeat, rows padded to b_pad
        return keep_rows(jnp.repeat(jax.lax.slice_in_dim(x, 0, n, axis=axis), g_size, axis=axis), b, b_pad, axis)

    def grow(cache, slots: int):  # zero-pads the cache's slot axis to `slots`
        extra = slots - cache.valid_bk.shape[1]
        pad_kv = lambda x: sampler.kv_sharded(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0))))  # noqa: E731
        valid_bk = sampler.rows_sharded(jnp.pad(cache.valid_bk, ((0, 0), (0, extra))))
        return cache._replace(k_lbgkd=pad_kv(cache.k_lbgkd), v_lbgkd=pad_kv(cache.v_lbgkd), valid_bk=valid_bk)

    # Decode segment i runs steps [ends[i-1], ends[i]) over a cache of P + ends[i] slots:
    # every row shares the write slot, so early steps need not attend over the empty tail.
    ends = sorted({-(-t_max * (i + 1) // sampler.decode_segments) for i in range(sampler.decode_segments)})
    cache = cache._replace(k_lbgkd=expand(cache.k_lbgkd, axis=1), v_lbgkd=expand(cache.v_lbgkd, axis=1),
                           valid_bk=expand(cache.valid_bk))  # fmt: skip
    logits_bv = sampler.rows_sharded(expand(logits_nv))
    lengths_b = sampler.rows_sharded(expand(lengths_n))

    # Row keys fold in the global row (= rollout) index, so draws do not depend on the mesh.
    row_keys_b = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(b_pad))
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

    def body(s: _Loop):
        positions_b1 = (lengths_b + s.t - 1)[:, None]  # token t-1 sits at prompt length + t - 1
        logits_b1v, cache = model(s.last_tok_b[:, None], positions_b1, s.last_valid_b[:, None], s.cache)
        tok_b, live_b, done_b, lp_b, ent_b, hist_bl, stop_len_b = pick(
            logits_b1v[:, 0], s.t, s.done_b, s.hist_bl, s.stop_len_b)
        return _Loop(
            s.t + 1, cache, tok_b, live_b, done_b, hist_bl, stop_len_b,
            write(s.tokens_bt, tok_b, s.t), write(s.mask_bt, live_b, s.t),
            write(s.logp_bt, lp_b, s.t), write(s.entropy_bt, ent_b, s.t),
        )  # fmt: skip

    out = init
    for end in ends:  # stops as soon as every row has stopped
        out = out._replace(cache=grow(out.cache, p + end))
        out = jax.lax.while_loop(lambda s, end=end: (s.t < end) & ~jnp.all(s.done_b), body, out)
    return _Decoded(out.tokens_bt, out.mask_bt, out.logp_bt, out.entropy_bt, out.done_b, out.stop_len_b, out.t)


def decode_refill(sampler: DecodeStep, model, prompt_cache, prompt_valid_np, logits_nv, lengths_n, rng, stop_at_r, b: int,
                  s_rows: int) -> _Decoded:  # fmt: skip
    """Continuous batching in fixed shapes: ``s_rows`` slots; a slot whose rollout ends takes the
    next pending rollout (ids in group-major order) at the next iteration.

    Inserting rollout r = n·G + g copies prompt n's prefill KV into the slot's first P cache
    slots and clears the rest of its valid row; its first token is drawn from prompt n's
    prefill logits (the slot's forward that iteration feeds a dummy token, marked invalid).
    The last T cache slots are a ring: iteration i writes every row's new key into column
    P + i mod T (one shared column: an in-place dynamic-update-slice; a per-row scatter into
    the layer-scanned cache made XLA copy the whole cache). A rollout lives at most T
    iterations, so it never overwrites its own keys; ``valid_bk`` masks the rest (``ring``).
    Each draw uses the stream fold_in(fold_in(rng, r), t) with t the rollout's own step, and
    each rollout attends over exactly its own prompt and tokens (in ring order: sums may
    differ from the plain loop's in the last bits), so rollouts equal the one-row-per-rollout
    loop's.
    """
    cfg, g_size, pad_id, mcfg = sampler.cfg, sampler.group_size, sampler.pad_id, model.cfg
    p, t_max = prompt_valid_np.shape[1], cfg.max_new_tokens
    b_pad = round_up(b, 1 if sampler.mesh is None else batch_divisor(sampler.mesh))
    pk_lngpd, pv_lngpd = prompt_cache.k_lbgkd, prompt_cache.v_lbgkd

    def insert(cache, ins_s, rid_s):
        """Copies prompt KV into the slots ``ins_s`` (one dynamic-update-slice per inserted slot)."""
        n_s = jnp.minimum(rid_s, b - 1) // g_size
        fresh_sk = jnp.pad(prompt_valid_np[n_s], ((0, 0), (0, t_max)))
        valid_sk = sampler.rows_sharded(jnp.where(ins_s[:, None], fresh_sk, cache.valid_bk))
        order_s = jnp.argsort(~ins_s, stable=True)  # inserted slots first

        def one(j, kv):
            slot = order_s[j]
            start = (0, slot, 0, 0, 0)
            return tuple(jax.lax.dynamic_update_slice(c, jax.lax.dynamic_slice_in_dim(pc, n_s[slot], 1, axis=1),
                                                      start) for c, pc in zip(kv, (pk_lngpd, pv_lngpd)))  # fmt: skip

        k, v = jax.lax.fori_loop(0, jnp.sum(ins_s, dtype=jnp.int32), one, (cache.k_lbgkd, cache.v_lbgkd))
        return cache._replace(k_lbgkd=sampler.kv_sharded(k), v_lbgkd=sampler.kv_sharded(v), valid_bk=valid_sk)

    slots = jnp.arange(s_rows, dtype=jnp.int32)
    empty = init_cache(mcfg, s_rows, p + t_max)
    empty = empty._replace(k_lbgkd=sampler.kv_sharded(empty.k_lbgkd), v_lbgkd=sampler.kv_sharded(empty.v_lbgkd),
                           valid_bk=sampler.rows_sharded(empty.valid_bk))  # fmt: skip
    zeros = lambda dt: sampler.rows_sharded(jnp.zeros((b_pad, t_max), dt))  # noqa: E731
    init = _Slots(
        cache=insert(empty, slots < b, slots), rid_s=slots, step_s=jnp.zeros_like(slots),
        last_tok_s=jnp.full_like(slots, pad_id), hist_sl=sampler.hist(s_rows), stop_len_s=jnp.zeros_like(slots),
        next_rid=jnp.asarray(s_rows, jnp.int32), steps=jnp.zeros((), jnp.int32),
        tokens_rt=sampler.rows_sharded(jnp.full((b_pad, t_max), pad_id, jnp.int32)), mask_rt=zeros(bool),
        logp_rt=zeros(jnp.float32), entropy_rt=zeros(jnp.float32),
        done_r=jnp.zeros((b_pad,), bool), stop_len_r=jnp.zeros((b_pad,), jnp.int32),
    )  # fmt: skip

    def body(st: _Slots):
        active_s = st.rid_s < b
        rid_s = jnp.minimum(st.rid_s, b - 1)  # idle slots compute on a real rollout's inputs, then drop them
        n_s = rid_s // g_size
        fresh_s = st.step_s == 0
        feed_s = active_s & ~fresh_s  # feeds a real token this iteration
        positions_s1 = jnp.maximum(lengths_n[n_s] + st.step_s - 1, 0)[:, None]
        column = p + st.steps % t_max
        logits_s1v, cache = model(st.last_tok_s[:, None], positions_s1, feed_s[:, None],
                                  st.cache._replace(pos=column), ring=True)  # fmt: skip
        logits_sv = jax.lax.cond(jnp.any(fresh_s), lambda: jnp.where(fresh_s[:, None], logits_nv[n_s],
                                                                     logits_s1v[:, 0]),
                                 lambda: logits_s1v[:, 0])  # fmt: skip
        keys_s = jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(rng, r), t))(rid_s, st.step_s)
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

    out = jax.lax.while_loop(lambda st: jnp.any(st.rid_s < b), body, init)
    return _Decoded(out.tokens_rt, out.mask_rt, out.logp_rt, out.entropy_rt, out.done_r, out.stop_len_r,
                    out.steps)  # fmt: skip
