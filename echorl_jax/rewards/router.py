"""The ``reward`` config section and the router that sends each response to its verifier.

Which verifier grades a row (verl's convention: the record's ``data_source``):
  1. the first ``reward.by_source`` entry ``"PATTERN=VERIFIER"`` whose pattern
     matches the row's data_source (``fnmatch``: ``"gsm8k"``, ``"numina_*"``);
  2. else ``reward.name``; ``"auto"`` = ``arith`` for the built-in task's rows
     (data_source ``"arith"``), ``choice`` for data_prep's multiple-choice sets
     (``choice.CHOICE_SOURCES``), ``math`` for everything else.
A verifier is a registered name (``registry.VERIFIERS``) or ``"custom"``, the
user's function in ``reward.custom`` (see ``rewards/custom.py``).

The router groups a batch's rows by verifier, calls each verifier once on its
rows and scatters rewards back in order; ``info`` counters are summed over
verifiers. Built-in verifiers are built on first use (no math workers for a run
that never sees a math row); the custom function is imported at start-up, so a
bad path fails before any model loads.
"""

from __future__ import annotations

import dataclasses
import os
from fnmatch import fnmatchcase
from typing import Any, Callable, Sequence

import numpy as np

from echorl_jax.rewards.base import RewardResult
from echorl_jax.rewards.choice import CHOICE_SOURCES
from echorl_jax.rewards.custom import CustomReward, RewardRow, is_file_spec, split_spec
from echorl_jax.rewards.registry import VERIFIERS, get_verifier

AUTO, CUSTOM = "auto", "custom"
ARITH_SOURCE = "arith"  # tasks.arith.DATA_SOURCE (not imported: tasks.arith imports rewards)
_MATH_ONLY = ("strict", "think", "format_reward", "correct_reward", "timeout_s", "num_workers")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Config section ``reward``; the math options apply to the ``math`` verifier only."""

    name: str = "auto"  # auto | math | arith | custom: the verifier for rows no by_source entry matches
    by_source: tuple = ()  # "PATTERN=VERIFIER" strings, first match on the row's data_source wins
    strict: bool = True  # math: grade only a \boxed{} / "answer is X" / "#### X" answer; False = also the last number
    think: bool = False  # math: R1-style responses: require "</think>" and grade only the text after it (LUFFY)
    format_reward: float = 0.0  # math: added when the final answer is a well-formed \boxed{}
    correct_reward: float = 1.0  # math: reward of a correct answer
    timeout_s: float = 5.0  # math: wall-clock limit per response (the worker is killed; scores 0)
    num_workers: int = 2  # math: worker processes
    custom: str = ""  # "path/to/file.py:fn" or "package.module:fn", used where name/by_source say "custom"
    custom_timeout_s: float = 30.0  # custom: wall-clock limit per row (worker killed, row scores 0); 0 = in-process, no limit
    custom_workers: int = 2  # custom: worker processes

    def routes(self) -> list[tuple[str, str]]:
        """``by_source`` as ``(pattern, verifier)`` pairs."""
        out = []
        for entry in self.by_source:
            pattern, sep, name = str(entry).partition("=")
            if not isinstance(entry, str) or not sep or not pattern.strip() or not name.strip():
                raise ValueError(f"reward.by_source entry {entry!r} is invalid: expected 'SOURCE=VERIFIER'")
            out.append((pattern.strip(), name.strip()))
        return out

    def changed_math_options(self) -> list[str]:
        """The math-only options set away from their defaults."""
        return [k for k in _MATH_ONLY if getattr(self, k) != getattr(RewardConfig, k)]

    def used_verifiers(self) -> set[str]:
        names = {self.name} | {name for _, name in self.routes()}
        if AUTO in names:
            names = (names - {AUTO}) | {"arith", "math", "choice"}
        return names

    def validate(self) -> None:
        known = sorted({*VERIFIERS, CUSTOM})
        if self.name not in (AUTO, *known):
            raise ValueError(f"reward.name={self.name!r} is unknown; known verifiers: {', '.join([AUTO, *known])}")
        for pattern, name in self.routes():
            if name not in known:
                raise ValueError(
                    f"reward.by_source entry '{pattern}={name}': unknown verifier {name!r}; known: {', '.join(known)}"
                )
        used = self.used_verifiers()
        if CUSTOM in used and not self.custom:
            raise ValueError("reward.custom is empty but reward.name or reward.by_source uses 'custom'")
        if not self.custom:
            changed = [k for k in ("custom_timeout_s", "custom_workers") if getattr(self, k) != getattr(RewardConfig, k)]
            if changed:
                raise ValueError(f"reward.{changed[0]} is set but reward.custom is empty (no custom reward function)")
        if self.custom_timeout_s < 0:
            raise ValueError(f"reward.custom_timeout_s={self.custom_timeout_s!r} must be >= 0 (0 = no limit, in-process)")
        if self.custom_workers < 1:
            raise ValueError(f"reward.custom_workers={self.custom_workers!r} must be >= 1")
        if self.custom:
            if CUSTOM not in used:
                raise ValueError(
                    f"reward.custom={self.custom!r} is set but unused: set reward.name='custom' "
                    "or add a reward.by_source entry 'SOURCE=custom'"
                )
            module, _ = split_spec(self.custom)
            if is_file_spec(module) and not os.path.isfile(module):
                raise ValueError(f"reward.custom={self.custom!r}: file {module!r} does not exist")
        if "math" not in used:
            changed = self.changed_math_options()
            if changed:
                raise ValueError(
                    f"reward.{changed[0]} is set but no row is graded by the math verifier "
                    f"(reward.name={self.name!r}, by_source={self.by_source})"
                )
        if self.timeout_s <= 0:
            raise ValueError(f"reward.timeout_s={self.timeout_s!r} must be > 0")
        if self.num_workers < 1:
            raise ValueError(f"reward.num_workers={self.num_workers!r} must be >= 1")


def check_against_data(cfg: RewardConfig, data_sources: Sequence[str]) -> dict[str, str]:
    """The verifier of every data source (sorted), after refusing what the data would silently ignore:
    a ``reward.by_source`` pattern that matches none of the sources (a typo routes nothing), and a math
    option (``reward.strict``, ``format_reward`` ...) set while no source routes to the math verifier
    (``validate`` catches routings that never reach math; this catches ``auto`` on data without math rows).
    ValueError names the pattern or option and the data's sources."""
    router = RewardRouter(cfg.name, cfg.routes(), {})
    table = {src: router.verifier_for(src) for src in sorted(set(data_sources))}
    shown = ", ".join(f"{src or '(none)'} -> {name}" for src, name in list(table.items())[:8])
    shown += ", ..." if len(table) > 8 else ""
    for pattern, name in router.routes:
        if not any(fnmatchcase(src, pattern) for src in table):
            raise ValueError(f"reward.by_source entry '{pattern}={name}' matches no data_source of the train or eval "
                             f"data (data_source -> verifier: {shown}); fix the pattern (fnmatch: 'numina_*') or "
                             "remove the entry")
    changed = cfg.changed_math_options()
    if changed and "math" not in table.values():
        raise ValueError(f"reward.{changed[0]} is set but no row of the data is graded by the math verifier "
                         f"(data_source -> verifier: {shown})")
    return table


def verifier_kwargs(cfg: RewardConfig, name: str) -> dict[str, Any]:
    """The config options a registered verifier takes (only math has options)."""
    if name != "math":
        return {}
    return dict(strict=cfg.strict, think=cfg.think, format_reward=cfg.format_reward, correct_reward=cfg.correct_reward,
                timeout_s=cfg.timeout_s, num_workers=cfg.num_workers)  # fmt: skip


class RewardRouter:
    """``(responses, ground_truths, rows) -> RewardResult``, each row graded by its routed verifier."""

    takes_rows = True

    def __init__(self, default: str, routes: Sequence[tuple[str, str]], factories: dict[str, Callable[[], Any]]):
        self.default = default
        self.routes = list(routes)
        self._factories = factories
        self._built: dict[str, Any] = {}

    def verifier_for(self, data_source: str) -> str:
        for pattern, name in self.routes:
            if fnmatchcase(data_source, pattern):
                return name
        if self.default == AUTO:
            if data_source == ARITH_SOURCE:
                return "arith"
            return "choice" if data_source in CHOICE_SOURCES else "math"
        return self.default

    def get(self, name: str):
        if name not in self._built:
            self._built[name] = self._factories[name]()
        return self._built[name]

    def __call__(
        self, responses: Sequence[str], ground_truths: Sequence[str], rows: Sequence[RewardRow]
    ) -> RewardResult:
        n = len(responses)
        if not (len(ground_truths) == len(rows) == n):
            raise ValueError(f"RewardRouter: {n} responses, {len(ground_truths)} ground truths, {len(rows)} rows")
        names = [self.verifier_for(r.data_source) for r in rows]
        reward_n = np.zeros(n, np.float32)
        correct_n = np.zeros(n, bool)
        info: dict[str, float] = {}
        for name in dict.fromkeys(names):  # first-seen order: deterministic
            idx = [i for i, x in enumerate(names) if x == name]
            res = call_verifier(self.get(name), [responses[i] for i in idx], [ground_truths[i] for i in idx],
                                [rows[i] for i in idx])  # fmt: skip
            reward_n[idx] = np.asarray(res.reward_n, np.float32)
            correct_n[idx] = np.asarray(res.correct_n, bool)
            for k, v in res.info.items():
                info[k] = info.get(k, 0.0) + float(v)
        return RewardResult(reward_n=reward_n, correct_n=correct_n, info=info)

    def close(self) -> None:
        for v in self._built.values():
            if hasattr(v, "close"):
                v.close()
        self._built.clear()


def build_router(cfg: RewardConfig) -> RewardRouter:
    """The router ``cfg`` describes; imports ``cfg.custom`` now (RewardSetupError if it is bad)."""
    cfg.validate()
    factories: dict[str, Callable[[], Any]] = {
        name: (lambda name=name: get_verifier(name, **verifier_kwargs(cfg, name))) for name in VERIFIERS
    }
    if cfg.custom:
        custom = CustomReward(cfg.custom, timeout_s=cfg.custom_timeout_s, num_workers=cfg.custom_workers)
        factories[CUSTOM] = lambda: custom
    return RewardRouter(cfg.name, cfg.routes(), factories)


def call_verifier(verifier, responses: Sequence[str], ground_truths: Sequence[str], rows: Sequence[RewardRow] | None):
    """Row-aware verifiers (``takes_rows``) get ``rows``; plain ``Verifier``s get texts and truths only."""
    if getattr(verifier, "takes_rows", False):
        if rows is None:
            raise ValueError(f"{type(verifier).__name__} routes by data_source: pass the rows (batch records)")
        return verifier(responses, ground_truths, rows)
    return verifier(responses, ground_truths)


def rows_for_batch(batch, records: Sequence[dict] | None, repeat: int) -> list[RewardRow]:
    """One RewardRow per response of a PromptBatch (each prompt ``repeat`` times, group-major)."""
    out = []
    for n, source in enumerate(batch.data_source):
        idx = int(batch.record_index[n])
        rec = records[idx] if records is not None and idx >= 0 else {}
        extra = rec.get("extra_info")
        row = RewardRow(source, extra if isinstance(extra, dict) else {}, rec.get("prompt"), idx)
        out.extend([row] * repeat)
    return out
