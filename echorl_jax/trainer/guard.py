"""Collapse guard: notice when a run degenerates, say which metric showed it, optionally stop.

Measured on the default task (RESULTS.md): at a too-large learning rate the
policy stops emitting the stop token; responses run to ``max_new_tokens``
(``response/clip_ratio`` -> 1), entropy rises, accuracy falls to 0 and, once every
group fails, every advantage is 0 and nothing can pull the run back. Each rule
compares a recent window with the run's own start, so it needs no per-task
threshold:

- train accuracy: mean over the last ``window`` steps below ``drop`` x its best
  windowed mean (which must have been >= ``min_level``);
- held-out accuracy: latest avg@k below ``drop`` x the first (>= ``min_level``);
- entropy: windowed mean above ``rise`` x the first window's mean;
- stopping: windowed clip ratio above 0.5 when the first window's was below 0.1;
- non-finite updates: the latest step skipped an update whose loss or gradient was NaN/Inf
  (``update.skip_nonfinite``); ``NonFinite`` stops the run after ``train.max_nonfinite_updates``
  in a row, whatever the guard's mode.

``train.collapse_guard``: ``warn`` (default) logs each triggered rule once;
``stop`` also ends the run after saving a checkpoint; ``off``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MODES = ("off", "warn", "stop")


@dataclasses.dataclass(frozen=True)
class GuardRules:
    window: int = 5
    drop: float = 0.5
    rise: float = 4.0
    min_level: float = 0.1


def _windows(values: list[float], w: int) -> np.ndarray:
    v = np.asarray(values, np.float64)
    return np.convolve(v, np.ones(w) / w, mode="valid") if len(v) >= w else np.empty(0)


def check(train_rows: list[dict], eval_rows: list[dict], rules: GuardRules = GuardRules()) -> dict[str, str]:
    """Rule name -> message, for every rule the run's metrics trigger now (pure; the caller dedups)."""
    out: dict[str, str] = {}
    w = rules.window
    series = lambda key: [r[key] for r in train_rows if r.get(key) is not None]
    acc = _windows(series("accuracy"), w)
    if len(acc) and acc[:-1].size and acc[:-1].max() >= rules.min_level and acc[-1] < rules.drop * acc[:-1].max():
        out["train_accuracy"] = (f"train accuracy collapsed: mean of the last {w} steps {acc[-1]:.3f} vs "
                                 f"{acc[:-1].max():.3f} earlier")  # fmt: skip
    key = next((k for k in (eval_rows[0] if eval_rows else {}) if k.startswith("avg@") and "/" not in k), None)
    if key and len(eval_rows) > 1:
        first, last = eval_rows[0].get(key), eval_rows[-1].get(key)
        if first is not None and last is not None and first >= rules.min_level and last < rules.drop * first:
            out["heldout_accuracy"] = f"held-out {key} collapsed: {last:.3f} vs {first:.3f} at the first evaluation"
    ent = _windows(series("entropy/mean"), w)
    if len(ent) > w and ent[0] > 0 and ent[-1] > rules.rise * ent[0]:
        out["entropy"] = f"sampling entropy exploded: {ent[-1]:.3f} (last {w} steps) vs {ent[0]:.3f} at the start"
    skipped = series("skipped_updates")
    if skipped and skipped[-1] > 0:
        out["nonfinite"] = (f"{skipped[-1]:.0f} update(s) skipped at the latest step: the loss or gradient was NaN/Inf "
                            "(skipped_updates counts them; train.max_nonfinite_updates in a row stop the run)")
    clip = _windows(series("response/clip_ratio"), w)
    if len(clip) > w and clip[0] < 0.1 and clip[-1] > 0.5:
        out["no_stop"] = (f"responses stopped ending: {clip[-1]:.0%} hit sampling.max_new_tokens over the last {w} "
                          f"steps vs {clip[0]:.0%} at the start")  # fmt: skip
    return out


TRAIN_KEYS = ("accuracy", "entropy/mean", "response/clip_ratio", "skipped_updates")  # what check() reads of a train row


def _kept(row: dict, kind: str) -> dict:
    """The part of a row ``check`` reads (what a checkpoint carries)."""
    if kind == "train":
        return {k: row[k] for k in TRAIN_KEYS if k in row}
    return {k: v for k, v in row.items() if k.startswith("avg@") and "/" not in k}


class Guard:
    """Feeds logged rows to ``check``; reports each rule the first time it triggers.

    ``state()`` / ``load()``: the rows seen so far and the rules that fired, saved with each checkpoint, so a
    resumed run compares its steps with the run's own start, not with the restart's."""

    def __init__(self, mode: str, log, rules: GuardRules = GuardRules()):
        self.mode, self.log, self.rules = mode, log, rules
        self.train_rows: list[dict] = []
        self.eval_rows: list[dict] = []
        self.fired: dict[str, str] = {}

    def state(self) -> dict:
        return {"train": self.train_rows, "eval": self.eval_rows, "fired": self.fired}

    def load(self, state: dict | None) -> None:
        """Continues from ``state()`` (None or {}: a checkpoint from before guards were saved: start empty)."""
        if state:
            self.train_rows = [dict(r) for r in state.get("train", [])]
            self.eval_rows = [dict(r) for r in state.get("eval", [])]
            self.fired = dict(state.get("fired", {}))

    def update(self, row: dict, kind: str = "train") -> bool:
        """Adds a row; returns True when the run should stop (mode ``stop`` and a rule fired)."""
        if self.mode == "off" or not row:
            return False
        (self.train_rows if kind == "train" else self.eval_rows).append(_kept(row, kind))
        new = {k: v for k, v in check(self.train_rows, self.eval_rows, self.rules).items() if k not in self.fired}
        for name, msg in new.items():
            self.fired[name] = msg
            hint = "stopping (train.collapse_guard=stop)" if self.mode == "stop" else "lower optim.learning_rate?"
            self.log(f"WARNING collapse guard [{name}]: {msg}; {hint}")
        return bool(new) and self.mode == "stop"


class NonFinite:
    """Skipped (non-finite) updates in a row; ``limit`` of them (``train.max_nonfinite_updates``, 0 = never)
    stop the run. The count restarts with the process (a resume gets ``limit`` more tries)."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def update(self, skipped: list[float]) -> bool:
        """``skipped``: one 0/1 per optimizer update of a step, in order. True when the run should stop."""
        for x in skipped:
            self.in_a_row = self.in_a_row + 1 if x else 0
        return self.limit > 0 and self.in_a_row >= self.limit
