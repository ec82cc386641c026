"""Orbax save/restore of the full training state, and what happens when storage fails.

A checkpoint holds the train state (params, optimizer state, step) and a JSON
part: the data-iterator state, the collapse guard's history and the config.
Orbax writes each step into a temporary directory and renames it (or, on GCS,
writes a commit marker) when complete, so a save interrupted part-way
(preemption, a killed host) leaves the previous checkpoint as the latest.

Storage faults:

* a save that fails (full disk, quota, a write error; Orbax saves in the
  background, so the error surfaces at the next save or at the end) raises
  ``CheckpointError`` naming the step, the cause and the newest complete
  checkpoint, which Orbax left intact;
* a newest checkpoint that cannot be read back (truncated or deleted files):
  ``restore_newest`` warns, moves it aside (``STEP.corrupt-TIME``, which Orbax
  does not take for a step) and restores the one before; when none can be
  read it raises, never starting afresh silently.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from echorl_jax import sharding

# Orbax's replica-parallel save splits a replicated array's shard among its replicas, each writing a slice: one
# small XLA program compiled per array shape and device at the first save (about 100 per save of a tiny model
# on 8 CPU devices). Worth it for big shards replicated across hosts; for norms and biases (kilobytes) it is
# only compiles. Below this many bytes per slice, one replica writes the whole shard. The stored arrays are
# the same either way.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


@functools.cache  # once per process
def _use_replica_parallel_floor() -> None:
    # Orbax's default handler otherwise: keep its array-metadata store (per-host shard metadata)
    store = getattr(ocp.type_handlers.get_type_handler(jax.Array), "_array_metadata_store", None)
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
                                             array_metadata_store=store)  # fmt: skip
    absl_log = logging.getLogger("absl")  # Orbax warns on every override, which this one is by design
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_log.setLevel(level)


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        # gs://... (GCS, what multi-host runs need: every host writes its shards) goes to Orbax as it is.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._pending: int | None = None  # the step whose background save may still be running
        _use_replica_parallel_floor()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "host", "stream")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, host: dict, stream: Any = None) -> None:
        """``state``: pytree of jax arrays (sharded as they are); ``host``: JSON-serialisable dict; ``stream``:
        the streaming decoder's state (trainer/stream_source.py), a third item, or None.
        Raises ``CheckpointError`` when this save, or the previous one still running, fails."""
        self.wait()
        items = {"state": ocp.args.StandardSave(state), "host": ocp.args.JsonSave(host)}
        if stream is not None:
            items["stream"] = ocp.args.StandardSave(stream)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001  (OSError, tensorstore's ValueError, ...)
            raise self._save_failed(step, e) from e
        self._pending = step

    def _save_failed(self, step: int, error: Exception) -> CheckpointError:
        try:  # the manager's own step list is stale after a failed save: read the directory again
            self._manager.reload()
            kept = self._manager.latest_step()
        except Exception:  # noqa: BLE001
            kept = None
        intact = f"the newest complete checkpoint is step {kept} (intact: a rerun resumes from it)" if kept is not None \
            else "no earlier complete checkpoint exists"  # fmt: skip
        return CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: {type(error).__name__}: "
                               f"{str(error)[:500]}; {intact}. Free space (or fix the storage) and rerun.")  # fmt: skip

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restores onto the shardings of ``abstract_state`` (a pytree of ShapeDtypeStruct/arrays): any mesh,
        any number of processes (Orbax reads each device's slice of the saved arrays). Leaves that are ``SKIP``
        are not read (they come back as ``SKIP``)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to restore in {self.directory}")
        target = jax.tree.map(_as_abstract, abstract_state)
        if any(x is SKIP for x in jax.tree.leaves(target, is_leaf=_is_skip)):  # read only some arrays
            restore_args = jax.tree.map(_restore_args, target, is_leaf=_is_skip)
            state_args = ocp.args.PyTreeRestore(target, restore_args=restore_args)
        else:
            state_args = ocp.args.StandardRestore(target)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(state=state_args, host=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; name the checkpoint either way
            raise CheckpointError(f"cannot restore checkpoint step {step} from {self.directory}: {e}") from e
        return step, out["state"], dict(out["host"])

    def read_stream(self, target: Any, step: int) -> Any:
        """The ``stream`` item of checkpoint ``step``, onto the shardings of ``target`` (arrays or abstract)."""
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                stream=ocp.args.StandardRestore(jax.tree.map(_as_abstract, target))))
        except Exception as e:  # orbax raises many types; name the checkpoint either way
            raise CheckpointError(f"cannot restore the streaming rollouts of checkpoint step {step} from "
                                  f"{self.directory}: {e}") from e
        return out["stream"]

    def read_host(self, step: int | None = None) -> dict:
        """Only the JSON part of a checkpoint (config, data-iterator state): cheap, and it cannot fail on
        a model or batch whose shapes changed, so callers can check the config before restoring arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to restore in {self.directory}")
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(host=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; name the checkpoint either way
            raise CheckpointError(f"cannot read checkpoint step {step} from {self.directory}: {e}") from e
        return dict(out["host"])

    def restore_newest(self, abstract_state: Any, check_host: Callable[[int, dict], None],
                       log: Callable[[str], None]) -> tuple[int, Any, dict]:  # fmt: skip
        """The newest checkpoint that reads back whole. ``check_host(step, host)`` vets its JSON part before
        the arrays are read (a config that cannot continue the run raises there, and is not a fault).
        Unreadable newer steps are moved aside with a warning; every process takes the same decision."""
        failures = []
        for step in reversed(self.all_steps()):
            error = None
            try:
                host = self.read_host(step)
            except CheckpointError as e:
                error = e
            if not sharding.any_process(error is not None):
                check_host(step, host)
                try:
                    _, state, host = self.restore(abstract_state, step)
                except CheckpointError as e:
                    error = e
            if sharding.any_process(error is not None):
                failures.append((step, str(error or "failed on another process")[:300]))
                continue
            for bad, why in failures:
                log(f"WARNING checkpoint step {bad} in {self.directory} cannot be read back ({why}); moved it to "
                    f"{self.quarantine(bad)} and resumed from step {step}")  # fmt: skip
            return step, state, host
        lines = "\n".join(f"  step {s}: {why}" for s, why in failures)
        raise CheckpointError(f"no checkpoint in {self.directory} can be read back:\n{lines}\nMove the directory "
                              "aside to start afresh (nothing was changed).")  # fmt: skip

    def quarantine(self, step: int) -> str:
        """Renames step ``step``'s directory to ``STEP.corrupt-TIME`` (process 0; all wait). Returns the new path."""
        from etils import epath

        src = epath.Path(self.directory) / str(step)
        dest = epath.Path(self.directory) / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            src.rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"echorl: checkpoint {step} moved aside")
        self._manager.reload()
        return str(dest)

    def wait(self) -> None:
        """Waits for a background save; ``CheckpointError`` if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            step, self._pending = self._pending, None
            raise self._save_failed(step, e) from e
        self._pending = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


SKIP = ocp.PLACEHOLDER  # a leaf of a restore target that is not read (evaluation: the optimizer state)


def skipped(tree: Any) -> Any:
    """``tree`` (e.g. ``jax.eval_shape(optimizer.init, params)``) with every leaf ``SKIP``."""
    return jax.tree.map(lambda _: SKIP, tree)


def _is_skip(x) -> bool:
    return x is SKIP


def _restore_args(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
        return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
    return ocp.RestoreArgs()


def _as_abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x
