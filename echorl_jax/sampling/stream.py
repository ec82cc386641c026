"""Streaming decode: a pool of prompt groups and S decode slots whose state lives across RL steps.

The synchronous sampler (sampler.py) prefills a step's N prompts, decodes until the last of their N·G
rollouts ends and throws its state away. Here the decode state is a value, ``StreamState``, that the
caller threads through four jitted calls (trainer/stream_source.py drives them once per RL step):

    admit(weights, st, prompts [N, P], lengths [N], entries [N], rng, seq0)   prefill N prompts into free
                                                                                pool entries; queue their rollouts
    advance(weights, st, version, need) -> st         decode until ``need`` groups are complete (all G ended)
    harvest(st, entries [N]) -> (st, Rollout, version_bt)                      take N complete groups out
    drop(st, drop_q [Q]) -> st                         forget groups (their slots go idle)

**Pool.** Q entries (``rl.stream_batches`` × N); entry q holds prompt q's left-padded tokens, its
prefill KV ``[L, Q, g, P, d]`` and last logits, and its G rollouts ``r = q·G + g`` (R = Q·G). A rollout
is *pending* (queued, ``order_r`` = its admission number), *running* (in a slot) or *ended*; a group is
*complete* when its G rollouts ended. **Slots** are ``decode.decode_refill``'s: S rows of
``[prompt | response ring]`` KV cache; a slot whose rollout ends takes the oldest pending rollout (the
smallest ``order_r``: groups admitted earlier finish first), copies its prompt's KV in and draws its
first token from the prompt's logits. Nothing waits for a batch's last rollout: when ``need`` groups are
complete the loop stops with the other slots mid-rollout, and the next call continues them.

**Versions.** ``advance`` takes the policy version of the weights it decodes with and writes it beside
every token (``version_rt``), with the log-prob the sampler drew it with (``logp_rt``): a rollout carried
into the next step continues under the new weights (PipelineRL's in-flight update; its KV cache, written
by the older weights, is kept), so one rollout may span versions. Before a round decodes with new weights
the pool's prompts are prefilled again (``refresh``): a rollout that starts then draws its first token
from, and attends over, a prompt prefilled by the weights its first token's tag names, so the oldest
weights any rollout depends on are its first token's version and the bound on tokens bounds it whole. Draws use the rollout's own key stream
``fold_in(fold_in(rng_admit, n·G + g), t)`` (``rng_admit`` the admission's key, ``n`` the prompt's row in
its admission batch, ``t`` the rollout's own step), the stream the synchronous sampler gives row
``n·G + g``: with a pool of N (one batch, ``stream_batches = 1``) every step admits, decodes and harvests
exactly the synchronous batch.

``StreamPool`` is the host side: which entries are live, their admission order and the caller's record of
each prompt; it admits, drops groups past the staleness bound and harvests, for the trainer's streaming
source and for bench/streaming.py alike.

Fixed shapes: Q, S, P and T are static; prompts are decoded at the full width P (no prompt buckets).
Several processes: one pool partition per process (``StreamPool``). Shape letters: q pool entries (Q), r
rollouts (R = Q·G), s slots (S), n admitted prompts (N), p prompt width (P), t response length (T).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from echorl_jax.models.decode_attention import LiveKeys
from echorl_jax.models.transformer import KVCache, init_cache, positions_from_valid
from echorl_jax.sampling.decode import block_buckets, prompt_row, refill_extent, response_columns
from echorl_jax.sampling.sampler import Rollout, Sampler
from echorl_jax import sharding
from echorl_jax.sharding import batch_divisor, batch_sharding, replicated

NEVER = 2**30  # order_r of a rollout that is not pending; stop_at_r of a rollout never forced to stop


class StreamState(NamedTuple):
    """The streaming decoder's whole state (device arrays; a checkpoint saves it as it is)."""

    prompt_qp: jax.Array  # int32 left-padded prompt of each entry (pad_id off ``valid_qp``)
    valid_qp: jax.Array  # bool
    length_q: jax.Array  # int32 real prompt tokens
    pk: jax.Array  # [L, Q, g, P, d] prompt KV, prefilled by the weights that admitted the entry
    pv: jax.Array
    logits_qv: jax.Array  # f32 logits after the prompt (each rollout's first draw)
    live_q: jax.Array  # bool admitted and neither harvested nor dropped
    key_r: jax.Array  # uint32 key data of rollout r's stream
    order_r: jax.Array  # int32 admission number while pending; NEVER once started (or not admitted)
    stop_at_r: jax.Array  # int32 bench/test hook: forced stop at this 1-based token (NEVER: not forced)
    cache: KVCache  # [L, S, g, P + ring, d] the slots' KV
    rid_s: jax.Array  # int32 rollout each slot decodes (R: idle)
    step_s: jax.Array  # int32 that rollout's next response index
    last_tok_s: jax.Array  # int32 its token step-1, fed this iteration
    hist_sl: jax.Array  # int32 its last L tokens (multi-token stops)
    stop_len_s: jax.Array  # int32
    steps: jax.Array  # int32 decode iterations so far (the ring's write column is steps mod ring)
    busy: jax.Array  # int32 slot-iterations that drew a real token, so far (occupancy = busy / (steps·S))
    tokens_rt: jax.Array  # int32 response tokens
    mask_rt: jax.Array  # bool drawn (through the first stop)
    logp_rt: jax.Array  # f32 the sampler's log-prob of each token (the behaviour policy)
    entropy_rt: jax.Array  # f32
    version_rt: jax.Array  # int32 policy version that drew each token
    done_r: jax.Array  # bool ended with a stop
    stop_len_r: jax.Array  # int32
    ended_r: jax.Array  # bool ended (stop or T tokens)


class Status(NamedTuple):
    """Per entry, on the host: what the source decides from."""

    live_q: Any  # bool
    complete_q: Any  # bool live and its G rollouts ended
    oldest_q: Any  # int32 oldest version among its drawn tokens (NEVER: none drawn yet)
    running_r: Any  # int rollouts in slots


class StreamDecoder:
    """The four jitted calls over one ``Sampler``'s config, stops and decode layout (see the module doc)."""

    def __init__(self, sampler: Sampler, pool: int, slots: int, prompt_len: int, parts: int = 1):
        if pool % parts:
            raise ValueError(f"a pool of {pool} entries does not split into {parts} equal process partitions")
        self.sampler, self.q, self.s_rows, self.p, self.parts = sampler, pool, slots, prompt_len, parts
        self.g = sampler.group_size
        self.r = pool * self.g
        self.t = sampler.cfg.max_new_tokens
        self.block = sampler.block_size()
        self.ring = response_columns(self.t, self.block)
        self.key_impl = None
        # Pool-indexed arrays are sharded over the batch axes when Q divides evenly, else left to XLA.
        self.pool_sharded = sampler.mesh is None or pool % sampler.layout.groups == 0
        self.admit = jax.jit(self._admit, donate_argnums=1)
        self.advance = jax.jit(self._advance, donate_argnums=1)
        self.harvest = jax.jit(self._harvest, donate_argnums=0)
        self.drop = jax.jit(self._drop, donate_argnums=0)
        self.refresh = jax.jit(self._refresh, donate_argnums=1)
        self.status = jax.jit(self._status)

    # ------------------------------------------------------------------ state

    def init(self, weights, key) -> StreamState:
        """An empty pool and idle slots for the decode copy ``weights`` (shapes and dtypes from it)."""
        self.key_impl = jax.random.key_impl(key)
        kd = jax.random.key_data(key)
        return jax.jit(lambda w: self._empty(w, kd))(weights)

    def _empty(self, weights, kd) -> StreamState:
        sp = self.sampler
        mcfg = nnx.merge(sp.graphdef, weights).cfg
        q, r, s, p, t, pad = self.q, self.r, self.s_rows, self.p, self.t, sp.pad_id
        prompt = init_cache(mcfg, q, p)
        slots = init_cache(mcfg, s, p + self.ring)
        i32 = lambda shape, v=0: jnp.full(shape, v, jnp.int32)  # noqa: E731
        rows = sp.rows_sharded if self.pool_sharded else (lambda x: x)  # noqa: E731
        kv = sp.kv_sharded if self.pool_sharded else (lambda x: x)  # noqa: E731
        return StreamState(
            prompt_qp=rows(i32((q, p), pad)), valid_qp=rows(jnp.zeros((q, p), bool)), length_q=i32((q,), 1),
            pk=kv(prompt.k_lbgkd), pv=kv(prompt.v_lbgkd),
            logits_qv=rows(jnp.zeros((q, mcfg.vocab_size), jnp.float32)), live_q=jnp.zeros((q,), bool),
            key_r=jnp.zeros((r, *kd.shape), kd.dtype), order_r=i32((r,), NEVER), stop_at_r=i32((r,), NEVER),
            cache=KVCache(sp.kv_sharded(slots.k_lbgkd), sp.kv_sharded(slots.v_lbgkd), sp.rows_sharded(slots.valid_bk),
                          slots.pos),
            rid_s=i32((s,), r), step_s=i32((s,)), last_tok_s=i32((s,), pad), hist_sl=sp.hist(s), stop_len_s=i32((s,)),
            steps=i32(()), busy=i32(()),
            tokens_rt=rows(i32((r, t), pad)), mask_rt=rows(jnp.zeros((r, t), bool)),
            logp_rt=rows(jnp.zeros((r, t), jnp.float32)), entropy_rt=rows(jnp.zeros((r, t), jnp.float32)),
            version_rt=rows(i32((r, t))), done_r=jnp.zeros((r,), bool), stop_len_r=i32((r,)),
            ended_r=jnp.zeros((r,), bool),
        )  # fmt: skip

    def abstract(self, weights, key) -> StreamState:
        """The state's abstract form (shapes, dtypes, shardings): what a checkpoint restores onto."""
        kd = jax.random.key_data(key)
        return jax.eval_shape(lambda w: self._empty(w, kd), weights)

    # ------------------------------------------------------------------ admit

    def _prefill(self, weights, prompt_np, valid_np):
        """Prompt KV [L, n, g, P, d] and the logits after each prompt, with ``weights``."""
        sp = self.sampler
        model = nnx.merge(sp.graphdef, weights)
        pos = positions_from_valid(valid_np)
        cache = init_cache(model.cfg, prompt_np.shape[0], prompt_np.shape[1])
        if prompt_np.shape[1] > 1:  # all but the last token: its logits are unused
            _, cache = model(prompt_np[:, :-1], pos[:, :-1], valid_np[:, :-1], cache)
        logits_n1v, cache = model(prompt_np[:, -1:], pos[:, -1:], valid_np[:, -1:], cache)
        return cache.k_lbgkd, cache.v_lbgkd, logits_n1v[:, 0].astype(jnp.float32)

    def _admit(self, weights, st: StreamState, prompt_np, lengths_n, entry_n, rng, seq0, stop_at_b):
        """Prefills prompts [N, P] into pool entries ``entry_n`` (free ones) and queues their N·G rollouts
        with admission numbers ``seq0 + n·G + g``; ``stop_at_b`` [N·G] (NEVER: none) is the bench hook."""
        sp, g, pad = self.sampler, self.g, self.sampler.pad_id
        n, p = prompt_np.shape
        lengths_n = lengths_n.astype(jnp.int32)
        valid_np = jnp.arange(p)[None, :] >= (p - lengths_n)[:, None]
        prompt_np = jnp.where(valid_np, prompt_np.astype(jnp.int32), pad)
        k, v, logits_nv = self._prefill(weights, prompt_np, valid_np)
        rid_b = (entry_n[:, None] * g + jnp.arange(g)[None, :]).reshape(-1)
        keys_b = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(n * g))
        return st._replace(
            prompt_qp=st.prompt_qp.at[entry_n].set(prompt_np, mode="drop"),
            valid_qp=st.valid_qp.at[entry_n].set(valid_np, mode="drop"),
            length_q=st.length_q.at[entry_n].set(lengths_n, mode="drop"),
            pk=st.pk.at[:, entry_n].set(k.astype(st.pk.dtype), mode="drop"),
            pv=st.pv.at[:, entry_n].set(v.astype(st.pv.dtype), mode="drop"),
            logits_qv=st.logits_qv.at[entry_n].set(logits_nv, mode="drop"), live_q=st.live_q.at[entry_n].set(True, mode="drop"),
            key_r=st.key_r.at[rid_b].set(jax.random.key_data(keys_b), mode="drop"),
            order_r=st.order_r.at[rid_b].set(seq0 + jnp.arange(n * g, dtype=jnp.int32), mode="drop"),
            stop_at_r=st.stop_at_r.at[rid_b].set(stop_at_b.astype(jnp.int32), mode="drop"),
            tokens_rt=st.tokens_rt.at[rid_b].set(pad, mode="drop"), mask_rt=st.mask_rt.at[rid_b].set(False, mode="drop"),
            logp_rt=st.logp_rt.at[rid_b].set(0.0, mode="drop"), entropy_rt=st.entropy_rt.at[rid_b].set(0.0, mode="drop"),
            version_rt=st.version_rt.at[rid_b].set(0, mode="drop"), done_r=st.done_r.at[rid_b].set(False, mode="drop"),
            stop_len_r=st.stop_len_r.at[rid_b].set(0, mode="drop"), ended_r=st.ended_r.at[rid_b].set(False, mode="drop"),
        )  # fmt: skip

    def _refresh(self, weights, st: StreamState) -> StreamState:
        """Prefills every pool entry again with ``weights``: a rollout that starts later draws its first token
        from, and attends over, a prompt prefilled by the weights its tag names (not those that admitted it)."""
        k, v, logits_qv = self._prefill(weights, st.prompt_qp, st.valid_qp)
        return st._replace(pk=k.astype(st.pk.dtype), pv=v.astype(st.pv.dtype), logits_qv=logits_qv)

    # ------------------------------------------------------------------ decode

    def _fill(self, st: StreamState, free_s) -> StreamState:
        """Slots ``free_s`` take the oldest pending rollouts (in slot order), or go idle when none is left."""
        sp, r, g, p = self.sampler, self.r, self.g, self.p
        k = min(self.s_rows, r)
        neg, cand = jax.lax.top_k(-st.order_r, k)  # the k smallest admission numbers
        j_s = jnp.cumsum(free_s, dtype=jnp.int32) - 1
        jc_s = jnp.clip(j_s, 0, k - 1)
        take_s = free_s & (j_s < k) & (-neg[jc_s] < NEVER)
        rid_s = jnp.where(take_s, cand[jc_s].astype(jnp.int32), jnp.where(free_s, r, st.rid_s))
        q_s = jnp.minimum(rid_s, r - 1) // g
        fresh_sk = jnp.pad(st.valid_qp[q_s], ((0, 0), (0, self.ring)))
        valid_sk = sp.rows_sharded(jnp.where(take_s[:, None], fresh_sk, st.cache.valid_bk))
        order_s = jnp.argsort(~take_s, stable=True)  # slots that take a rollout first

        def one(j, kv):
            slot = order_s[j]
            return tuple(jax.lax.dynamic_update_slice(c, prompt_row(sp, pc, q_s[slot]), (0, slot, 0, 0, 0))
                         for c, pc in zip(kv, (st.pk, st.pv)))  # fmt: skip

        kk, vv = jax.lax.fori_loop(0, jnp.sum(take_s, dtype=jnp.int32), one, (st.cache.k_lbgkd, st.cache.v_lbgkd))
        return st._replace(
            cache=st.cache._replace(k_lbgkd=sp.kv_sharded(kk), v_lbgkd=sp.kv_sharded(vv), valid_bk=valid_sk),
            rid_s=rid_s, step_s=jnp.where(free_s, 0, st.step_s),
            hist_sl=jnp.where(free_s[:, None], -2, st.hist_sl), stop_len_s=jnp.where(free_s, 0, st.stop_len_s),
            order_r=st.order_r.at[jnp.where(take_s, rid_s, r)].set(NEVER, mode="drop"),
        )  # fmt: skip

    def _complete(self, st: StreamState):
        return st.live_q & jnp.all(st.ended_r.reshape(self.q, self.g), axis=1)

    def _advance(self, weights, st: StreamState, version, need):
        """Decodes with ``weights`` (policy ``version``) until ``need`` live groups are complete or no slot
        has work; idle slots first take pending rollouts."""
        sp, r, g, p, t, ring, block = self.sampler, self.r, self.g, self.p, self.t, self.ring, self.block
        ring_blocks = ring // block
        model = nnx.merge(sp.graphdef, weights)
        version = jnp.asarray(version, jnp.int32)
        st = self._fill(st, st.rid_s >= r)

        def body(st: StreamState, blocks: int) -> StreamState:
            active_s = st.rid_s < r
            rid_s = jnp.minimum(st.rid_s, r - 1)  # idle slots compute on a real rollout's inputs, then drop them
            q_s = rid_s // g
            fresh_s = st.step_s == 0
            feed_s = active_s & ~fresh_s
            positions_s1 = jnp.maximum(st.length_q[q_s] + st.step_s - 1, 0)[:, None]
            col = st.steps % ring
            live = LiveKeys(p, block, blocks, ring_blocks, col // block - blocks + 1 + ring_blocks)
            logits_s1v, cache = model(st.last_tok_s[:, None], positions_s1, feed_s[:, None],
                                      st.cache._replace(pos=p + col), live=live)  # fmt: skip
            logits_sv = jax.lax.cond(jnp.any(fresh_s),
                                     lambda: jnp.where(fresh_s[:, None], st.logits_qv[q_s], logits_s1v[:, 0]),
                                     lambda: logits_s1v[:, 0])  # fmt: skip
            keys_s = jax.vmap(lambda kd, step: jax.random.fold_in(jax.random.wrap_key_data(kd, impl=self.key_impl),
                                                                  step))(st.key_r[rid_s], st.step_s)  # fmt: skip
            force_s = st.step_s == st.stop_at_r[rid_s] - 1
            tok_s, _, done_s, lp_s, ent_s, hist_sl, stop_len_s = sp.pick(
                logits_sv, keys_s, ~active_s, st.hist_sl, st.stop_len_s, force_s)
            at_r = jnp.where(active_s, rid_s, r)  # idle slots write out of bounds (dropped)

            def put(buf_rt, col_s):
                return buf_rt.at[at_r, st.step_s].set(col_s.astype(buf_rt.dtype), mode="drop")

            ended_s = active_s & (done_s | (st.step_s == t - 1))
            end_r = jnp.where(ended_s, rid_s, r)
            st = st._replace(
                cache=cache, last_tok_s=tok_s, hist_sl=hist_sl, stop_len_s=stop_len_s,
                step_s=st.step_s + 1, steps=st.steps + 1, busy=st.busy + jnp.sum(active_s, dtype=jnp.int32),
                tokens_rt=put(st.tokens_rt, tok_s), mask_rt=put(st.mask_rt, active_s), logp_rt=put(st.logp_rt, lp_s),
                entropy_rt=put(st.entropy_rt, ent_s), version_rt=put(st.version_rt, jnp.broadcast_to(version, tok_s.shape)),
                done_r=st.done_r.at[end_r].set(done_s, mode="drop"),
                stop_len_r=st.stop_len_r.at[end_r].set(stop_len_s, mode="drop"),
                ended_r=st.ended_r.at[end_r].set(True, mode="drop"),
            )  # fmt: skip
            return self._fill(st, ended_s)

        def going(st):  # until every process partition holds ``need`` complete groups (or nothing runs)
            done_p = jnp.sum(self._complete(st).reshape(self.parts, -1), axis=1, dtype=jnp.int32)
            return jnp.any(st.rid_s < r) & (jnp.min(done_p) < need)

        def extent(st):
            return refill_extent(st.steps, st.step_s, st.rid_s < r, block, ring)

        buckets = block_buckets(ring_blocks)

        def by_bucket(st):
            for blocks, lower in zip(buckets, [0] + buckets[:-1]):
                st = jax.lax.while_loop(lambda s, blocks=blocks, lower=lower: going(s) & (extent(s) <= blocks)
                                        & (extent(s) > lower), lambda s, blocks=blocks: body(s, blocks), st)  # fmt: skip
            return st

        return jax.lax.while_loop(going, by_bucket, st)

    # ------------------------------------------------------------------ out

    def _status(self, st: StreamState) -> Status:
        oldest_r = jnp.min(jnp.where(st.mask_rt, st.version_rt, NEVER), axis=1)
        oldest_q = jnp.min(oldest_r.reshape(self.q, self.g), axis=1)
        running = jnp.sum(st.rid_s < self.r, dtype=jnp.int32)
        return Status(st.live_q, self._complete(st), oldest_q, running)

    def _harvest(self, st: StreamState, entry_n):
        """Takes groups ``entry_n`` (complete) out of the pool: their rollout rows [N·G] group-major, as the
        synchronous sampler lays them out, and each response token's version [N·G, T]."""
        g = self.g
        rid_b = (entry_n[:, None] * g + jnp.arange(g)[None, :]).reshape(-1)
        mask_bt = st.mask_rt[rid_b]
        rollout = Rollout(
            tokens=jnp.concatenate([jnp.repeat(st.prompt_qp[entry_n], g, axis=0), st.tokens_rt[rid_b]], axis=1),
            valid=jnp.concatenate([jnp.repeat(st.valid_qp[entry_n], g, axis=0), mask_bt], axis=1),
            response_mask=mask_bt, behaviour_logp=st.logp_rt[rid_b], entropy=st.entropy_rt[rid_b],
            lengths=jnp.sum(mask_bt, axis=1, dtype=jnp.int32), truncated=~st.done_r[rid_b],
            stop_len=st.stop_len_r[rid_b],
        )  # fmt: skip
        version_bt = st.version_rt[rid_b]
        out_mesh = self.sampler.out_mesh  # the rollout leaves in the training mesh's batch layout, as the sampler's
        if out_mesh is not None and rid_b.shape[0] % batch_divisor(out_mesh) == 0:
            rollout = Rollout(*(jax.lax.with_sharding_constraint(x, batch_sharding(out_mesh, x.ndim)) for x in rollout))
            version_bt = jax.lax.with_sharding_constraint(version_bt, batch_sharding(out_mesh, 2))
        return st._replace(live_q=st.live_q.at[entry_n].set(False)), rollout, version_bt

    def _drop(self, st: StreamState, drop_q):
        """Forgets groups ``drop_q`` [Q] bool: no longer live, pending rollouts unqueued, slots idle."""
        drop_r = jnp.repeat(drop_q, self.g)
        in_slot_s = (st.rid_s < self.r) & drop_r[jnp.minimum(st.rid_s, self.r - 1)]
        return st._replace(
            live_q=st.live_q & ~drop_q, order_r=jnp.where(drop_r, NEVER, st.order_r),
            rid_s=jnp.where(in_slot_s, self.r, st.rid_s), step_s=jnp.where(in_slot_s, 0, st.step_s),
        )  # fmt: skip


class StreamPool:
    """The host side of a streaming decoder: N prompts per admission, harvests of N groups, the bound ``k``.

    ``draw(weights, version, next_prompts, key_for)`` is one round: admit while N entries are free
    (``next_prompts() -> (tokens [N, P], lengths [N], records [N], stop_at [N·G] or None)``, sampled with
    ``key_for(a)`` for the a-th admission), decode with ``weights`` at ``version`` until N groups are complete,
    and return the N admitted first as ``(records, rollout [N·G], version_bt [N·G, T])``. ``drop_stale(version)``
    first forgets groups holding a token more than ``k`` versions older than ``version``.

    **Several processes.** Each process drives its own partition of the pool, ``Q / H`` entries (``H``
    processes; ``n`` is then this process's prompts per admission, N / H): it admits its own prompts into its
    partition, and a harvest takes each partition's ``n`` oldest complete groups, in process order, so the
    rollout's rows are process-major as the synchronous sampler's (each process verifies its own rows). Every
    jitted call is collective: a process with no room in an admission passes rows that write nothing, and
    the decoder decodes until every partition has ``n`` complete groups."""

    def __init__(self, decoder: StreamDecoder, n: int, bound: int):
        self.dec, self.n, self.k = decoder, n, bound
        self.h, self.p = jax.process_count(), jax.process_index()
        if decoder.parts != self.h:
            raise ValueError(f"StreamDecoder(parts={decoder.parts}) in a {self.h}-process run: one partition per process")
        self.ql = decoder.q // self.h  # this process's entries: [p·ql, (p + 1)·ql) of the pool
        self.state = None
        self.live = np.zeros(self.ql, bool)
        self.seq = np.zeros(self.ql, np.int64)
        self.records: list[Any] = [None] * self.ql
        self.admitted = 0  # admission calls so far (collective: the same count on every process)
        self.read = (0, 0)  # (busy slot-iterations, iterations) at the last ``counters``
        self.fresh_at = -1  # the version every live entry's prompt was last prefilled with

    def start(self, weights, key) -> None:
        if self.state is None:
            self.state = self.dec.init(weights, key)

    def _put(self, x):
        """A host array, the same on every process, as the decoder's replicated input."""
        x = np.asarray(x)
        mesh = self.dec.sampler.mesh
        return jnp.asarray(x) if mesh is None or self.h == 1 else jax.device_put(x, replicated(mesh))

    def _local(self, x) -> np.ndarray:
        """This process's partition of a per-entry array the decoder returned."""
        return sharding.to_host(x)[self.p * self.ql : (self.p + 1) * self.ql]

    def _admit(self, weights, prompts, key) -> None:
        """One collective admission: ``prompts`` = this process's next prompts, or None when it has no room."""
        g, n = self.dec.g, self.n
        if prompts is None:  # rows that write nothing: out-of-range entries are dropped by the scatters
            tokens, lengths = np.zeros((n, self.dec.p), np.int32), np.ones(n, np.int32)
            entries, stop_at, records = np.full(n, self.dec.q, np.int32), np.full(n * g, NEVER, np.int32), None
        else:
            tokens, lengths, records, stop_at = prompts
            free = np.flatnonzero(~self.live)[:n]
            entries = (free + self.p * self.ql).astype(np.int32)
            stop_at = np.full(n * g, NEVER, np.int32) if stop_at is None else np.asarray(stop_at, np.int32)
        gathered = [sharding.gather_rows(np.asarray(x, np.int32)) for x in (tokens, lengths, entries, stop_at)]
        if self.h > 1 and key.is_fully_addressable:  # a key array goes across as its raw data
            key = jax.random.wrap_key_data(self._put(jax.random.key_data(key)), impl=jax.random.key_impl(key))
        tokens_all, lengths_all, entries_all, stop_all = (self._put(x) for x in gathered)
        self.state = self.dec.admit(weights, self.state, tokens_all, lengths_all, entries_all, key,
                                    self._put(np.int32(self.admitted * n * self.h * g)), stop_all)  # fmt: skip
        if records is not None:
            for j, q in enumerate(free):
                self.live[q], self.seq[q], self.records[q] = True, self.admitted * n + j, records[j]
        self.admitted += 1

    def drop_stale(self, version: int) -> int:
        """Forgets the live groups with a token more than ``k`` versions older than ``version``; how many (here)."""
        oldest = self._local(self.dec.status(self.state).oldest_q).astype(np.int64)
        stale = self.live & (oldest < NEVER) & (version - oldest > self.k)
        if sharding.any_process(bool(stale.any())):
            self.state = self.dec.drop(self.state, self._put(sharding.gather_rows(stale)))
            self.live[stale] = False
            for q in np.flatnonzero(stale):
                self.records[q] = None
        return int(stale.sum())

    def draw(self, weights, version: int, next_prompts, key_for, admissions: int = 0):
        """One round (see the class docstring); ``admissions``: admissions already made this step (keys)."""
        a = self.begin(weights, version, next_prompts, key_for, admissions)
        return (*self.finish(), a)

    def begin(self, weights, version: int, next_prompts, key_for, admissions: int = 0) -> int:
        """A round's first half: admit, then dispatch the decode (it runs on the sampler's devices while the
        host goes on; a sampler mesh of its own decodes it during the learner's update). Returns the
        admission count to carry on."""
        a = admissions
        if sharding.any_process(bool(self.live.any())) and self.fresh_at != version:
            self.state = self.dec.refresh(weights, self.state)  # carried groups: pending rollouts start fresh
        self.fresh_at = version
        while sharding.any_process(bool((~self.live).sum() >= self.n)):
            self._admit(weights, next_prompts() if (~self.live).sum() >= self.n else None, key_for(a))
            a += 1
        self.state = self.dec.advance(weights, self.state, version, self.n)
        return a

    def finish(self):
        """A round's second half: waits for the decode, takes the N complete groups admitted first out of the
        pool: ``(records, rollout, version_bt)`` on the training mesh."""
        complete = np.flatnonzero(self._local(self.dec.status(self.state).complete_q))
        take = complete[np.argsort(self.seq[complete], kind="stable")][: self.n]
        if len(take) < self.n:  # cannot happen: every live group ends within T decode steps
            raise RuntimeError(f"streaming: {len(take)} complete groups of {self.n} after decoding")
        take_all = sharding.gather_rows((take + self.p * self.ql).astype(np.int32))
        self.state, rollout, version_bt = self.dec.harvest(self.state, self._put(take_all))
        rollout, version_bt = self.dec.sampler.to_train_mesh((rollout, version_bt))
        records = [self.records[q] for q in take]
        self.live[take] = False
        for q in take:
            self.records[q] = None
        return records, rollout, version_bt

    def counters(self) -> dict[str, float]:
        """Since the last call: decode iterations, slot occupancy; now: rollouts mid-flight, groups live (all
        processes')."""
        st = self.dec.status(self.state)
        busy, steps = int(sharding.to_host(self.state.busy)), int(sharding.to_host(self.state.steps))
        d_busy, d_steps = busy - self.read[0], steps - self.read[1]
        self.read = (busy, steps)
        return {"sampler/decode_steps": float(d_steps),
                "sampler/slot_occupancy": d_busy / max(d_steps * self.dec.s_rows, 1),
                "stream/carried_rollouts": float(sharding.to_host(st.running_r)),
                "stream/carried_groups": float(sharding.to_host(st.live_q).sum())}  # fmt: skip

    def checkpoint(self) -> tuple[dict, dict]:
        """(the device state's non-empty leaves, the JSON part: every process's partition, in process order)."""
        parts = sharding.gather_objects({"live": self.live.tolist(), "seq": self.seq.tolist(), "records": self.records})
        host = {"parts": parts, "admitted": self.admitted, "read": list(self.read), "fresh_at": self.fresh_at}
        return _nonempty(self.state), host

    def restore(self, read_arrays, host: dict) -> None:
        """Continues a saved pool: ``read_arrays(target)`` reads the stream item onto ``target`` (``start`` first)."""
        if len(host["parts"]) != self.h:
            raise ValueError(f"the checkpoint's streaming pool has {len(host['parts'])} process partitions; this run "
                             f"has {self.h} processes (a streaming run resumes on as many processes as it saved)")
        leaves, treedef = jax.tree.flatten(self.state)
        got = read_arrays(_nonempty(self.state))
        self.state = jax.tree.unflatten(treedef, [got.get(str(i), x) for i, x in enumerate(leaves)])
        mine = host["parts"][self.p]
        self.live = np.asarray(mine["live"], bool)
        self.seq = np.asarray(mine["seq"], np.int64)
        self.records = list(mine["records"])
        self.admitted = int(host["admitted"])
        self.read = tuple(int(x) for x in host["read"])
        self.fresh_at = int(host["fresh_at"])


def _nonempty(state) -> dict:
    """The state's leaves by position, less the zero-size ones (no multi-token stops: no history columns),
    which Orbax cannot save; ``restore`` takes those from the fresh state."""
    return {str(i): x for i, x in enumerate(jax.tree.leaves(state)) if x.size}
