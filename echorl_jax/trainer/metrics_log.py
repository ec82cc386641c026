"""Metric sinks: JSONL in the workdir, TensorBoard, and a progress bar. Process 0 only.

A remote workdir (``storage.is_remote``: gs://...) gets its ``metrics.jsonl`` rewritten whole at most every
``storage.REMOTE_FLUSH_S`` seconds, at every ``flush()`` (the trainer flushes before each checkpoint, so a
resumed run finds every row up to its checkpoint) and at ``close()``.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import numpy as np

from echorl_jax.trainer import storage


def to_python(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        v = np.asarray(jax.device_get(v))
        if v.size == 1:
            f = float(v)
            out[k] = f if math.isfinite(f) else None
    return out


class MetricsLog:
    def __init__(self, workdir: str, *, resume_step: int | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = storage.join(workdir, "metrics.jsonl")
        self.remote = storage.is_remote(workdir)
        self._tb = None
        self._rows: list[dict] = []  # this run's rows so far (process 0)
        self._flushed = time.monotonic()
        if not self.enabled:
            return
        storage.makedirs(workdir)
        kept = [r for r in read_jsonl(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        self._rows = kept
        self._write_all()  # a resumed run drops the rows written after its checkpoint
        if tensorboard:
            try:
                self._tb = storage.tensorboard_writer(storage.join(workdir, "tensorboard"))
            except ImportError:  # optional sink
                self._tb = None

    def _write_all(self) -> None:
        storage.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self._rows))
        self._flushed = time.monotonic()

    def flush(self) -> None:
        """Every row so far is in the file (and TensorBoard's events), also in a bucket."""
        if self.enabled and self.remote:
            self._write_all()
        if self._tb is not None:
            self._tb.flush()

    def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> dict[str, float]:
        row = to_python(metrics)
        if self.enabled:
            full = {"step": step, "kind": kind, **row}
            self._rows.append(full)
            if not self.remote:
                with open(self.path, "a") as f:
                    f.write(json.dumps(full) + "\n")
            elif time.monotonic() - self._flushed > storage.REMOTE_FLUSH_S:
                self._write_all()
            if self._tb is not None:
                for k, v in row.items():
                    if v is not None:
                        self._tb.add_scalar(f"{kind}/{k}", v, step)
        return row

    def has(self, step: int, kind: str) -> bool:
        """Whether a ``kind`` row for ``step`` was written: process 0's answer on every process, so that all
        of them take the same branch (the others write no file)."""
        found = any(r.get("step") == step and r.get("kind") == kind for r in self._rows)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            found = bool(multihost_utils.broadcast_one_to_all(np.int32(found)))
        return found

    def last(self, kind: str) -> dict[str, float]:
        """The latest ``kind`` row's metrics (process 0; ``{}`` elsewhere)."""
        rows = [r for r in self._rows if r.get("kind") == kind]
        return {k: v for k, v in rows[-1].items() if k not in ("step", "kind")} if rows else {}

    def close(self) -> None:
        if self.enabled and self.remote:
            self._write_all()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    text = storage.read_text(os.fspath(path))
    return [] if text is None else [json.loads(line) for line in text.splitlines() if line.strip()]
