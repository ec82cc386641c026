"""Metric sinks: JSONL in the workdir, TensorBoard, and a progress bar. Process 0 only."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np


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
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        self._rows: list[dict] = []  # this run's rows so far (process 0)
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        kept = [r for r in read_jsonl(self.path) if resume_step is not None and r.get("step", 0) <= resume_step]
        with open(self.path, "w") as f:  # a resumed run drops the rows written after its checkpoint
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._rows = kept
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # optional sink
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> dict[str, float]:
        row = to_python(metrics)
        if self.enabled:
            full = {"step": step, "kind": kind, **row}
            self._rows.append(full)
            with open(self.path, "a") as f:
                f.write(json.dumps(full) + "\n")
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
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
