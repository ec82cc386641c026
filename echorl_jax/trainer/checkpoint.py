"""Orbax save/restore of the full training state.

A checkpoint holds the train state (params, optimizer state, step), the RNG
key data, the data-iterator state, the run's metrics history and the config.
Orbax writes each step into a temporary directory and renames it when
complete, so a save interrupted part-way (preemption) leaves the previous
checkpoint as the latest loadable one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        # gs://... (GCS, what multi-host runs need: every host writes its shards) goes to Orbax as it is.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "host")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, host: dict) -> None:
        """``state``: pytree of jax arrays (sharded as they are); ``host``: JSON-serialisable dict."""
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host))
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict]:
        """Restores onto the shardings of ``abstract_state`` (a pytree of ShapeDtypeStruct/arrays)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint to restore in {self.directory}")
        target = jax.tree.map(_as_abstract, abstract_state)
        try:
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(target), host=ocp.args.JsonRestore()),
            )
        except Exception as e:  # orbax raises many types; name the checkpoint either way
            raise CheckpointError(f"cannot restore checkpoint step {step} from {self.directory}: {e}") from e
        return step, out["state"], dict(out["host"])

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

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _as_abstract(x):
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, np.ndarray):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x
