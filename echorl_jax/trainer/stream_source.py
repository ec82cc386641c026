"""Streaming rollouts (``rl.max_staleness = k >= 1``): a rollout source whose decode state lives across steps.

Per learning step ``s`` (learner at version ``V = policy_version(s)``), ``StreamSource.next``:

1. **Bound.** Drops every live group holding a token older than ``V - k`` (it could never reach a loss
   within the bound, so finishing it would waste decode steps); counted in ``stream/dropped_groups``.
2. **Admit.** Prefills the carried groups' prompts again with this step's weights (so a rollout that starts
   now depends on no older weights than its first token's tag), then, while the pool has N free entries,
   draws the next N prompts from the train pipeline and prefills them (admission ``a`` of the step samples
   with ``fold_in(fold_in(key(train.seed), s), a)``).
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

Several processes: each drives its own partition of the pool with its own prompts, and a harvest takes each
partition's N oldest complete groups in process order, so every process verifies its own rows as with the
synchronous source (``sampling/stream.StreamPool``).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from echorl_jax.data.pipeline import PromptBatch
from echorl_jax.sampling.stream import StreamDecoder, StreamPool
from echorl_jax.trainer import rollout as rollout_lib
from echorl_jax.trainer.rollout_source import ScoredBatch, SyncSource, policy_version, push_weights, verify_args
from echorl_jax.trainer.setup import Setup


def make_source(s: Setup):
    """The run's rollout source: synchronous for ``rl.max_staleness = 0``, streaming otherwise."""
    return StreamSource(s) if s.cfg.rl.max_staleness > 0 else SyncSource(s)


class StreamSource:
    """Rollouts that never wait for a batch's longest one (see the module docstring)."""

    def __init__(self, s: Setup):
        cfg = s.cfg
        # this process's prompts per admission and per harvest: rl.prompts_per_step is every process's together
        self.s, self.k, self.n = s, cfg.rl.max_staleness, cfg.rl.prompts_per_step // jax.process_count()
        self.score = rollout_lib.make_scorer(cfg.objective, cfg.echo, s.delimiter_ids, cfg.sampling.max_new_tokens)
        self.base_key = jax.random.key(cfg.train.seed)
        self.pool: StreamPool | None = None
        self.split = s.sampler_devices is not None  # a sampler mesh of its own: decode overlaps the update
        self.weights = None  # the sampler's weights (split: kept between steps, pushed once per step)
        self.ahead, self.ahead_dropped, self.ahead_admissions = None, 0, 0  # a round dispatched during an update

    def ensure(self, params) -> StreamPool:
        """The decoder and its empty pool (built on the first step, or before a resume reads the saved one)."""
        if self.pool is None:
            s, sampler, width = self.s, self.s.sample, self.s.cfg.data.max_prompt_len
            plan = sampler.prepare(params, width)
            hosts = jax.process_count()
            q = s.cfg.rl.stream_batches * self.n * hosts  # each process its own partition of the pool
            slots = plan.rows(self.n * hosts * sampler.group_size)[0]
            self.pool = StreamPool(StreamDecoder(sampler, q, slots, width, parts=hosts), self.n, self.k)
            self.pool.start(s.decode_weights(sampler, params).params, self.base_key)
            s.log(f"streaming rollouts: rl.max_staleness={self.k}, a pool of {q} prompt groups "
                  f"(rl.stream_batches={s.cfg.rl.stream_batches} x {self.n * hosts}"
                  f"{f', {hosts} process partitions' if hosts > 1 else ''}), {slots} decode slots, prompts at "
                  f"width {width} (no prompt buckets)")  # fmt: skip
        return self.pool

    def _prompts(self):
        """The train pipeline's next N prompts, each with the record verification needs (JSON, for checkpoints)."""
        b: PromptBatch = next(self.s.train_pipeline)
        records = [{"tokens": b.tokens_np[j].tolist(), "length": int(b.length_n[j]), "ground_truth": b.ground_truth[j],
                    "data_source": b.data_source[j], "record_index": int(b.record_index[j])}
                   for j in range(len(b.ground_truth))]  # fmt: skip
        return b.tokens_np, b.length_n, records, None

    def next(self, params, step: int) -> ScoredBatch:
        s = self.s
        pool = self.ensure(params)
        version = policy_version(step)
        t0 = time.perf_counter()
        self.weights = push_weights(s, s.sample, params, version)  # a copy; with a sampler mesh a push, checked
        push = {"time/push": time.perf_counter() - t0, "push/bytes": float(s.sample.layout.pushed_bytes)} if self.split else {}
        step_key = jax.random.fold_in(self.base_key, step)
        ahead = self.ahead == step  # this step's first round was dispatched during the last update (split)
        self.ahead = None
        dropped = self.ahead_dropped if ahead else pool.drop_stale(version)
        admissions = self.ahead_admissions if ahead else 0

        def draw(rounds: int):
            nonlocal admissions, ahead
            if ahead:  # decoded with the weights of one version before (the learner was updating meanwhile)
                ahead = False
                rows, rollout, version_bt = pool.finish()
            else:
                rows, rollout, version_bt, admissions = pool.draw(
                    self.weights.params, version, self._prompts, lambda a: jax.random.fold_in(step_key, a), admissions)
            batch = PromptBatch(
                tokens_np=np.asarray([r["tokens"] for r in rows], np.int32),
                length_n=np.asarray([r["length"] for r in rows], np.int32),
                ground_truth=[r["ground_truth"] for r in rows], data_source=[r["data_source"] for r in rows],
                record_index=np.asarray([r["record_index"] for r in rows], np.int64),
                valid_n=np.ones(len(rows), bool),
            )  # fmt: skip
            return batch, rollout, version_bt

        timings: dict[str, float] = {}
        got = rollout_lib.collect_from(draw, **verify_args(s, timings))
        if not self.split:
            self.weights = None  # colocated: the copy is freed before the update
        ro = got.rollout
        reward_ng, adv_bt, clips = self.score(ro, jnp.asarray(got.reward_ng))
        metrics = {"stream/dropped_groups": float(dropped), "stream/admissions": float(admissions), **pool.counters(),
                   **push}  # fmt: skip
        return ScoredBatch(rollout=ro, reward_ng=reward_ng, correct_ng=got.correct_ng, adv_bt=adv_bt, clips=clips,
                           version_bt=got.version_bt, info=got.info, rounds=got.rounds,
                           sampled_tokens=got.sampled_tokens, timings=timings, source_metrics=metrics)  # fmt: skip

    def overlap(self, step: int) -> Callable[[], tuple[float, float]] | None:
        """Called as learning step ``step`` starts on the learner's devices: with a sampler mesh of its
        own, dispatches step ``step + 1``'s first round (drop, admit, decode) with the weights this step pushed
        (version ``policy_version(step)``, one behind the learner that will consume it). Returns ``wait()``, which
        waits for the decode and gives the sampler's busy interval (``time.perf_counter`` seconds), or None
        (colocated)."""
        if not self.split:  # also at a run's last step: the checkpoint keeps the round, and a longer run resumes it
            return None
        t0 = time.perf_counter()
        pool, nxt = self.pool, step + 1
        self.s.sample.layout.check_landed(self.weights, policy_version(step))
        self.ahead_dropped = pool.drop_stale(policy_version(nxt))
        key = jax.random.fold_in(self.base_key, nxt)
        self.ahead_admissions = pool.begin(self.weights.params, policy_version(step), self._prompts,
                                           lambda a: jax.random.fold_in(key, a))  # fmt: skip
        self.ahead = nxt
        return busy_until_ready(t0, pool.state)


    def checkpoint(self) -> tuple[Any, dict]:
        """(the decode state's arrays, the pool's JSON part); nothing before the first step. A round dispatched
        ahead (split) is in the decode state; the JSON part says so."""
        if self.pool is None:
            return None, {}
        arrays, host = self.pool.checkpoint()
        return arrays, {**host, "ahead": self.ahead, "ahead_dropped": self.ahead_dropped,
                        "ahead_admissions": self.ahead_admissions}  # fmt: skip

    def restore(self, read_arrays, params, host: dict) -> None:
        """Continues the pool a checkpoint saved (``read_arrays(target)`` reads its stream item)."""
        if host:
            self.ensure(params).restore(read_arrays, host)
            self.ahead, self.ahead_dropped = host.get("ahead"), host.get("ahead_dropped", 0)
            self.ahead_admissions = host.get("ahead_admissions", 0)


def busy_until_ready(t0: float, tree) -> Callable[[], tuple[float, float]]:
    """``wait() -> (t0, t_done)``: when ``tree``'s arrays were ready, seen by a thread that only waits (no
    dispatch), so the host can wait for the learner meanwhile and both intervals are timed as they ran."""
    done: list[float] = []
    watcher = threading.Thread(target=lambda: (jax.block_until_ready(tree), done.append(time.perf_counter())),
                               daemon=True)  # fmt: skip
    watcher.start()

    def wait():
        watcher.join()
        return t0, done[0]

    return wait
