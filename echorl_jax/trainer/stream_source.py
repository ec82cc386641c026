"""Streaming rollouts (``rl.max_staleness = k >= 1``): a rollout source whose decode state lives across steps.

Per learning step ``s`` (learner at version ``V = policy_version(s)``), ``StreamSource.next``:

1. **Bound.** Drops every live group holding a token older than ``V - k`` (it could never reach a loss
   within the bound, so finishing it would waste decode steps); counted in ``stream/dropped_groups``.
2. **Admit.** While the pool has N free entries, draws the next N prompts from the train pipeline and
   prefills them with this step's weights (admission ``a`` of the step samples with
   ``fold_in(fold_in(key(train.seed), s), a)``).
3. **Decode** (``sampling/stream.py``) with this step's weights, tagging tokens with version ``V``, until N
   groups are complete; rollouts still running stay in their slots for the next step.
4. **Harvest** the N complete groups admitted first, verify and score them like the synchronous source.
   Every harvested token is at most ``k`` versions old (step 1 dropped the rest; step 3 writes ``V``);
   the learning step checks it again and stops the run if not (trainer/learn_step.py).

With DAPO dynamic sampling steps 2-4 repeat per round (``rollout.collect_from``). ``k = 0`` is the
synchronous source itself (``make_source``); a pool of one batch (``rl.stream_batches = 1``) admits, decodes
and harvests exactly the synchronous batch each step, with any k.

**Memory.** The pool's prompt KV (Q × P columns) and the slots' KV (S × (P + ring)) stay resident on the
decode devices through the update: no host round trip, and what the synchronous sampler holds during
sampling plus the pool's prompt columns (``stream_batches`` × N × P) during the update too.

**Resume.** A checkpoint holds the decode state (``StreamState``, an Orbax item beside the train state)
and the pool's prompt records (JSON), so a resumed run continues every in-flight rollout exactly where
the straight run did: same tokens, same versions.

Single process only: harvesting takes the oldest complete groups wherever their prompts came from, while
verification decodes each process's own rows (``rollout.own_rows``); per-process pool partitions are the
next step (docs/training.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from echorl_jax import config as config_lib
from echorl_jax.data.pipeline import PromptBatch
from echorl_jax.sampling.stream import NEVER, StreamDecoder
from echorl_jax.trainer import rollout as rollout_lib
from echorl_jax.trainer.rollout_source import ScoredBatch, SyncSource, policy_version
from echorl_jax.trainer.setup import Setup


def make_source(s: Setup):
    """The run's rollout source: synchronous for ``rl.max_staleness = 0``, streaming otherwise."""
    return StreamSource(s) if s.cfg.rl.max_staleness > 0 else SyncSource(s)


class StreamSource:
    """Rollouts that never wait for a batch's longest one (see the module docstring)."""

    def __init__(self, s: Setup):
        if jax.process_count() > 1:
            raise config_lib.ConfigError(
                f"config key rl.max_staleness={s.cfg.rl.max_staleness} is invalid: streaming rollouts run in one "
                f"process for now ({jax.process_count()} here); use rl.max_staleness=0 on several hosts")
        cfg = s.cfg
        self.s, self.k = s, cfg.rl.max_staleness
        self.n = cfg.rl.prompts_per_step
        self.score = rollout_lib.make_scorer(cfg.objective, cfg.echo, s.delimiter_ids, cfg.sampling.max_new_tokens)
        self.base_key = jax.random.key(cfg.train.seed)
        self.dec: StreamDecoder | None = None
        self.state = None
        # host side of the pool, per entry: live, admission number (order of the group), the prompt's record
        self.q = 0
        self.live = np.zeros(0, bool)
        self.seq = np.zeros(0, np.int64)
        self.rows: list[dict | None] = []
        self.admitted = 0  # groups admitted so far (their admission numbers)
        self.step_admissions = 0  # prompt batches admitted during this step (their keys)
        self._busy = self._steps = 0  # decode counters at the last reading

    # ------------------------------------------------------------------ setup

    def ensure(self, params, width: int) -> None:
        """Builds the decoder and an empty pool for prompts of ``width`` columns (first step, or a resume)."""
        if self.dec is not None:
            return
        s, sampler = self.s, self.s.sample
        plan = sampler.prepare(params, width)
        g_on = sampler.group_size
        div = sampler.layout.groups
        self.q = -(-self.s.cfg.rl.stream_batches * self.n // div) * div
        slots = plan.rows(self.n * g_on)[0]
        self.dec = StreamDecoder(sampler, self.q, slots, width)
        self.state = self.dec.init(s.decode_weights(sampler, params).params, self.base_key)
        self.live = np.zeros(self.q, bool)
        self.seq = np.zeros(self.q, np.int64)
        self.rows = [None] * self.q
        s.log(f"streaming rollouts: rl.max_staleness={self.k}, a pool of {self.q} prompt groups "
              f"(rl.stream_batches={s.cfg.rl.stream_batches} x {self.n}), {slots} decode slots, prompts at "
              f"width {width} (no prompt buckets)")  # fmt: skip

    # ------------------------------------------------------------------ one step

    def _admit(self, weights, step: int, a: int) -> None:
        batch: PromptBatch = next(self.s.train_pipeline)
        free = np.flatnonzero(~self.live)[: self.n]
        g = self.dec.g
        stop_at = np.full(self.n * g, NEVER, np.int32)
        self.state = self.dec.admit(weights, self.state, jnp.asarray(batch.tokens_np, jnp.int32),
                                    jnp.asarray(batch.length_n, jnp.int32), jnp.asarray(free, jnp.int32),
                                    jax.random.fold_in(jax.random.fold_in(self.base_key, step), a),
                                    jnp.asarray(self.admitted * g, jnp.int32), jnp.asarray(stop_at))  # fmt: skip
        for j, q in enumerate(free):
            self.live[q], self.seq[q] = True, self.admitted + j
            self.rows[q] = {"tokens": batch.tokens_np[j].tolist(), "length": int(batch.length_n[j]),
                            "ground_truth": batch.ground_truth[j], "data_source": batch.data_source[j],
                            "record_index": int(batch.record_index[j])}  # fmt: skip
        self.admitted += self.n

    def _draw(self, params, step: int):
        """One round: admissions, decoding, the harvest of N complete groups -> (prompt batch, rollout, versions)."""
        s = self.s
        weights = s.decode_weights(s.sample, params).params
        version = policy_version(step)
        while (~self.live).sum() >= self.n:
            self._admit(weights, step, self.step_admissions)
            self.step_admissions += 1
        self.state = self.dec.advance(weights, self.state, version, self.n)
        st = self.dec.status(self.state)
        complete = np.asarray(st.complete_q)
        order = np.flatnonzero(complete)
        order = order[np.argsort(self.seq[order], kind="stable")][: self.n]
        if len(order) < self.n:  # cannot happen while every live group can finish (T is bounded)
            raise RuntimeError(f"streaming: {len(order)} complete groups of {self.n} after decoding")
        self.state, rollout, version_bt = self.dec.harvest(self.state, jnp.asarray(order, jnp.int32))
        rows = [self.rows[q] for q in order]
        self.live[order] = False
        for q in order:
            self.rows[q] = None
        batch = PromptBatch(
            tokens_np=np.asarray([r["tokens"] for r in rows], np.int32),
            length_n=np.asarray([r["length"] for r in rows], np.int32),
            ground_truth=[r["ground_truth"] for r in rows], data_source=[r["data_source"] for r in rows],
            record_index=np.asarray([r["record_index"] for r in rows], np.int64), valid_n=np.ones(len(rows), bool),
        )  # fmt: skip
        return batch, rollout, version_bt

    def _drop_stale(self, step: int) -> int:
        """Drops the live groups with a token older than the bound allows at ``step``; returns how many."""
        st = self.dec.status(self.state)
        oldest = np.asarray(st.oldest_q).astype(np.int64)
        stale = self.live & (oldest < NEVER) & (policy_version(step) - oldest > self.k)
        if stale.any():
            self.state = self.dec.drop(self.state, jnp.asarray(stale))
            self.live[stale] = False
            for q in np.flatnonzero(stale):
                self.rows[q] = None
        return int(stale.sum())

    def next(self, params, step: int) -> ScoredBatch:
        s, cfg, rl = self.s, self.s.cfg, self.s.cfg.rl
        self.ensure(params, cfg.data.max_prompt_len)
        timings: dict[str, float] = {}
        self.step_admissions = 0
        dropped = self._drop_stale(step)
        got = rollout_lib.collect_from(
            lambda rounds: self._draw(params, step),
            verifier=s.verifier, tokenizer=s.tokenizer, group_size=rl.group_size,
            dynamic_sampling=cfg.objective.dynamic_sampling,
            echo_threshold=cfg.echo.success_threshold if cfg.echo.enabled else None,
            max_rounds=rl.max_sample_rounds, timings=timings, records=s.train_records,
            add_experts=s.experts.add_to if s.experts is not None else None,
        )  # fmt: skip
        ro = got.rollout
        reward_ng, adv_bt, clips = self.score(ro, jnp.asarray(got.reward_ng))
        st = self.dec.status(self.state)
        busy, steps = int(self.state.busy), int(self.state.steps)
        d_busy, d_steps = busy - self._busy, steps - self._steps
        self._busy, self._steps = busy, steps
        metrics = {
            "stream/dropped_groups": float(dropped),
            "stream/carried_rollouts": float(st.running_r),  # in slots mid-rollout, continued next step
            "stream/carried_groups": float(self.live.sum()),  # admitted, not yet harvested
            "stream/admissions": float(self.step_admissions),
            "sampler/decode_steps": float(d_steps),
            "sampler/slot_occupancy": d_busy / max(d_steps * self.dec.s_rows, 1),
        }
        return ScoredBatch(rollout=ro, reward_ng=reward_ng, correct_ng=got.correct_ng, adv_bt=adv_bt, clips=clips,
                           version_bt=got.version_bt,
                           info=got.info, rounds=got.rounds, sampled_tokens=got.sampled_tokens, timings=timings,
                           source_metrics=metrics)  # fmt: skip

    # ------------------------------------------------------------------ checkpoints

    def checkpoint(self) -> tuple[Any, dict]:
        """(device state or None, JSON part) for a checkpoint."""
        if self.dec is None:
            return None, {}
        host = {"live": self.live.tolist(), "seq": self.seq.tolist(), "rows": self.rows, "admitted": self.admitted,
                "busy": self._busy, "steps": self._steps}  # fmt: skip
        return _nonempty(self.state), host

    def restore(self, read_arrays, params, host: dict) -> None:
        """Continues the pool a checkpoint saved: ``read_arrays(target)`` reads its stream item onto ``target``."""
        if not host:
            return
        self.ensure(params, self.s.cfg.data.max_prompt_len)
        leaves, treedef = jax.tree.flatten(self.state)
        got = read_arrays(_nonempty(self.state))
        self.state = jax.tree.unflatten(treedef, [got.get(str(i), x) for i, x in enumerate(leaves)])
        self.live = np.asarray(host["live"], bool)
        self.seq = np.asarray(host["seq"], np.int64)
        self.rows = list(host["rows"])
        self.admitted = int(host["admitted"])
        self._busy, self._steps = int(host["busy"]), int(host["steps"])


def _nonempty(state) -> dict:
    """The state's leaves by position, less the zero-size ones (no multi-token stops: no history columns),
    which Orbax cannot save; restore takes those from the fresh state."""
    return {str(i): x for i, x in enumerate(jax.tree.leaves(state)) if x.size}
