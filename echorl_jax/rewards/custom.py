"""A user's reward function, named in the config as ``"path/to/file.py:fn"`` or ``"package.module:fn"``.

The function is called on the host, once per response, in the trainer process::

    def fn(response: str, ground_truth: str, *, data_source: str, extra_info: dict, prompt) -> float | tuple[float, bool]

``prompt`` is the record's prompt (a string or a list of chat messages),
``extra_info`` the record's ``extra_info`` column (verl parquet) or ``{}``. A float
return is the reward and counts as correct when ``> 0``; ``(reward, correct)``
sets accuracy explicitly (e.g. partial credit that is not a solve). The response
is untrusted model output: parse it, never ``eval`` it. The function is trusted
code (it runs with the trainer's rights).

Time limit (``reward.custom_timeout_s``, default 30 s): the function runs in
``reward.custom_workers`` worker processes (``workers.WorkerPool``; each imports
the file or module itself, so module-level state is per worker); a call that
runs longer is killed with its worker. A row whose call times out or raises
scores 0 (not correct) and is counted (``custom_timeouts``, ``custom_errors`` in
the verifier counters, ``reward_info/*`` in the metrics), with a warning naming
the first such row; the run continues. ``custom_timeout_s=0`` calls the function
in the trainer process, without a limit (raising rows still score 0). A return
value that is not a reward is a bug in the function, not in one row: it stops the
run with ``RewardFnError``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import os
import sys
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from echorl_jax.rewards import workers
from echorl_jax.rewards.base import RewardResult

logger = logging.getLogger(__name__)


class RewardSetupError(ValueError):
    """A reward config that cannot be built (bad hook path, missing function)."""


class RewardFnError(RuntimeError):
    """The user's reward function raised or returned something that is not a reward."""


class RewardRow(NamedTuple):
    """What a row-aware verifier knows about one response besides its text and ground truth."""

    data_source: str
    extra_info: dict
    prompt: Any  # str | list[dict]; None when the record is unknown
    record_index: int  # index into the records list; -1 when unknown


def split_spec(spec: str) -> tuple[str, str]:
    """``"a/b.py:fn"`` -> ``("a/b.py", "fn")``; the last ``:`` splits (``C:\\x.py:fn`` works)."""
    module, sep, fn = spec.rpartition(":")
    if not sep or not module or not fn.isidentifier():
        raise RewardSetupError(
            f"reward.custom={spec!r}: expected 'path/to/file.py:function' or 'package.module:function'"
        )
    return module, fn


def is_file_spec(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def load_reward_fn(spec: str) -> Callable:
    """Import the function ``spec`` names; errors name the spec and what is missing."""
    module_name, fn_name = split_spec(spec)
    try:
        if is_file_spec(module_name):
            if not os.path.isfile(module_name):
                raise RewardSetupError(f"reward.custom={spec!r}: file {module_name!r} does not exist")
            mod_id = "echorl_custom_reward_" + os.path.splitext(os.path.basename(module_name))[0]
            loader_spec = importlib.util.spec_from_file_location(mod_id, module_name)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_id] = module  # as importlib's recipe: dataclasses/pickle in the file look it up
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[mod_id]
                raise
        else:
            module = importlib.import_module(module_name)
    except RewardSetupError:
        raise
    except Exception as e:  # noqa: BLE001  (ImportError, SyntaxError, anything the module raises)
        raise RewardSetupError(
            f"reward.custom={spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise RewardSetupError(
            f"reward.custom={spec!r}: {module_name!r} has no function {fn_name!r} (callables there: {public})"
        )
    return fn


def _as_reward(out: Any) -> tuple[float, bool] | None:
    """A float (correct when > 0) or ``(float, bool)``; None if ``out`` is neither."""
    if isinstance(out, tuple) and len(out) == 2:
        (r, c), explicit = out, True
    else:
        r, c, explicit = out, None, False
    if not isinstance(r, (int, float, np.number)) or not math.isfinite(float(r)):
        return None
    if explicit and not isinstance(c, (bool, np.bool_)):
        return None
    return float(r), bool(c) if explicit else float(r) > 0


class BadRewardValue(ValueError):
    """The function returned something that is not a reward (a bug in the function, not in a row)."""


def _call(fn: Callable, task: Sequence) -> tuple[float, bool]:
    text, truth, data_source, extra_info, prompt = task
    out = fn(text, truth, data_source=data_source, extra_info=extra_info, prompt=prompt)
    got = _as_reward(out)
    if got is None:
        raise BadRewardValue(f"returned {out!r:.100}; expected a finite float or (float, bool)")
    return got


_WORKER_FN: Callable | None = None


def _worker_init(spec: str) -> None:
    global _WORKER_FN
    _WORKER_FN = load_reward_fn(spec)


def _worker_main(fd: int) -> None:
    """A custom-reward worker process (``workers.serve``): imports the function once, then scores rows."""
    workers.serve(fd, lambda task: list(_call(_WORKER_FN, task)), init=_worker_init)


class CustomReward:
    """Row-aware verifier around a user's function (see the module docstring). ``fn`` given: called in this
    process (it cannot be sent to a worker); else the function ``spec`` names, in workers when ``timeout_s > 0``."""

    takes_rows = True  # called as (responses, ground_truths, rows)

    def __init__(self, spec: str, fn: Callable | None = None, *, timeout_s: float = 0.0, num_workers: int = 1):
        self.spec = spec
        self.fn = fn if fn is not None else load_reward_fn(spec)  # a bad spec fails here, at start-up
        self.timeout_s, self.num_workers = float(timeout_s), int(num_workers)
        self._use_workers = fn is None and self.timeout_s > 0
        self._pool: workers.WorkerPool | None = None  # started on first use

    def _results(self, tasks: list[tuple]) -> list:
        if not self._use_workers:
            out = []
            for task in tasks:
                try:
                    out.append(list(_call(self.fn, task)))
                except BadRewardValue as e:
                    out.append(workers.Failed(f"BadRewardValue: {e}"))
                except Exception as e:  # noqa: BLE001  (one row's failure; counted below)
                    out.append(workers.Failed(f"{type(e).__name__}: {e}"))
            return out
        if self._pool is None:
            self._pool = workers.WorkerPool("echorl_jax.rewards.custom:_worker_main", self.spec,
                                            num_workers=self.num_workers, timeout_s=self.timeout_s,
                                            name=f"custom reward {self.spec!r}")  # fmt: skip
        return self._pool.run(tasks)

    def __call__(
        self, responses: Sequence[str], ground_truths: Sequence[str], rows: Sequence[RewardRow]
    ) -> RewardResult:
        n = len(responses)
        reward_n = np.zeros(n, np.float32)
        correct_n = np.zeros(n, bool)
        tasks = [(text, truth, row.data_source, row.extra_info, row.prompt)
                 for text, truth, row in zip(responses, ground_truths, rows, strict=True)]  # fmt: skip
        info = {"custom_errors": 0.0, "custom_timeouts": 0.0}
        first = None
        for i, res in enumerate(self._results(tasks)):
            row = rows[i]
            where = f"row {i} (record {row.record_index}, data_source {row.data_source!r})"
            if isinstance(res, workers.Failed) and res.startswith("BadRewardValue: "):
                raise RewardFnError(f"custom reward {self.spec!r} {res[len('BadRewardValue: '):]} on {where}")
            if res == workers.TIMEOUT or isinstance(res, workers.Failed):
                key = "custom_timeouts" if res == workers.TIMEOUT else "custom_errors"
                info[key] += 1
                if first is None:
                    why = f"ran over reward.custom_timeout_s={self.timeout_s:g}" if res == workers.TIMEOUT else f"raised {res}"
                    first = f"{why} on {where}"
                continue
            reward_n[i], correct_n[i] = float(res[0]), bool(res[1])
        if first is not None:
            logger.warning("custom reward %r: %d of %d rows scored 0 (%d raised, %d timed out); first: %s", self.spec,
                           info["custom_errors"] + info["custom_timeouts"], n, info["custom_errors"],
                           info["custom_timeouts"], first)  # fmt: skip
        return RewardResult(reward_n=reward_n, correct_n=correct_n, info=info)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
