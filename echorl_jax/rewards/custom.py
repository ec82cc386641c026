"""A user's reward function, named in the config as ``"path/to/file.py:fn"`` or ``"package.module:fn"``.

The function is called on the host, once per response, in the trainer process::

    def fn(response: str, ground_truth: str, *, data_source: str, extra_info: dict, prompt) -> float | tuple[float, bool]

``prompt`` is the record's prompt (a string or a list of chat messages),
``extra_info`` the record's ``extra_info`` column (verl parquet) or ``{}``. A float
return is the reward and counts as correct when ``> 0``; ``(reward, correct)``
sets accuracy explicitly (e.g. partial credit that is not a solve). The response
is untrusted model output: parse it, never ``eval`` it. The function is trusted
code (it runs with the trainer's rights, without a timeout).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from echorl_jax.rewards.base import RewardResult


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


class CustomReward:
    """Row-aware verifier around a user's function (see the module docstring)."""

    takes_rows = True  # called as (responses, ground_truths, rows)

    def __init__(self, spec: str, fn: Callable | None = None):
        self.spec = spec
        self.fn = fn if fn is not None else load_reward_fn(spec)

    def __call__(
        self, responses: Sequence[str], ground_truths: Sequence[str], rows: Sequence[RewardRow]
    ) -> RewardResult:
        n = len(responses)
        reward_n = np.zeros(n, np.float32)
        correct_n = np.zeros(n, bool)
        for i, (text, truth, row) in enumerate(zip(responses, ground_truths, rows, strict=True)):
            where = f"row {i} (record {row.record_index}, data_source {row.data_source!r})"
            try:
                out = self.fn(text, truth, data_source=row.data_source, extra_info=row.extra_info, prompt=row.prompt)
            except Exception as e:
                raise RewardFnError(f"custom reward {self.spec!r} raised on {where}: {type(e).__name__}: {e}") from e
            got = _as_reward(out)
            if got is None:
                raise RewardFnError(
                    f"custom reward {self.spec!r} returned {out!r:.100} on {where}; "
                    "expected a finite float or (float, bool)"
                )
            reward_n[i], correct_n[i] = got
        return RewardResult(reward_n=reward_n, correct_n=correct_n, info={})
