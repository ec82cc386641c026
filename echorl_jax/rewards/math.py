"""Math verifier: grade the response's final answer with math-verify, in killable workers.

Answer extraction (``find_answer``) — the first rule that finds a candidate decides:
  0. Responses longer than ``max_chars`` (20k) keep only their last ``max_chars``
     characters: the final answer is at the end, and parsing cost grows with length.
  1. The last ``\\boxed{...}`` / ``\\fbox{...}`` (braces balanced, nesting allowed).
     If that box is empty or never closed (generation cut off) there is no answer;
     earlier boxes never count, as in MATH graders ("last answer wins").
  2. Else the last "answer is X" / "answer: X" ("Final answer", markdown bold and
     GSM8K's "#### X" too). X is the rest of that line, or the next non-blank line
     when the rest is blank. X that reads as bare math (no LaTeX delimiters, no
     English words) is parsed as LaTeX (``\\sqrt{2}``, ``(1, 2]``); otherwise
     math-verify picks the expression out of the prose ("12 cm." -> 12).
  3. Only with ``strict=False``: else math-verify's own extraction over the whole
     text ("final answer is" / "answer:" anchors first, then the rightmost LaTeX or
     number). Off by default because it grades noise: an untrained model's
     ``marbles 1/5 3M the tot`` "answers" 3. With ``strict=True`` (the default) a
     response without a rule-1 or rule-2 marker has no answer and scores 0.
The ground truth is parsed as the content of a box, so bare LaTeX (``\\frac12``) works.
Equivalence is ``math_verify.verify(gold, pred)`` (symbolic, numeric to 6 places,
sets/intervals, percentages).

Isolation (``workers.WorkerPool``). Each item runs in a worker process with a per-item
wall-clock limit; on expiry the worker is SIGKILLed and replaced (``9^{9^{9^9}}`` hangs
inside C big-int code, where math-verify's own SIGALRM timeouts cannot fire, so they are
disabled). A worker that dies mid-item is replaced and the item scores 0. Workers get an
address-space limit and answer with JSON, never pickle, so a compromised worker cannot
hand the trainer code to run.

Eval safety (math-verify 0.9.0, latex2sympy2_extended 1.11, sympy 1.14). Neither
package calls ``eval``/``exec`` on text itself, but sympy's ``parse_expr`` (and
``sympify(str)``, which calls it) ends in ``eval``. It is reached from:
  * math-verify's plain-expression extraction, ``parse_expr(m, evaluate=False)``,
    where ``m`` matched ``[\\d.\\s+\\-*/^()×÷]`` (no names, so no code — but ``9**9**9``);
  * ``sympy.Number(text)`` on numbers matched by a regex or the LaTeX lexer;
  * constant strings inside sympy at import time (``sympy.physics.units``).
LaTeX itself goes through an ANTLR grammar that builds sympy objects directly.
Workers also install ``_eval_guard``: ``parse_expr`` refuses any text that is not
plain arithmetic unless it comes from a module import.
"""

from __future__ import annotations

import logging
import re
import sys
from functools import lru_cache
from typing import Callable, NamedTuple, Sequence

import numpy as np

from echorl_jax.rewards import workers
from echorl_jax.rewards.base import RewardResult

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- #
# Answer extraction (pure, in-process).
# --------------------------------------------------------------------------- #

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_RE = re.compile(
    r"(?i:\banswer(?:\*\*)?\s*(?:is\b|:))\s*:?(?:\*\*)?[ \t]*(?P<tail>[^\n]*)"
    r"|^[ \t]*####[ \t]*(?P<hash_tail>[^\n]*)",
    re.MULTILINE,
)
_LATEX_DELIMS = ("$", "\\(", "\\[")
_LATEX_CMD_RE = re.compile(r"\\text\{[^{}]*\}|\\[A-Za-z]+")
_WORD_RE = re.compile(r"[A-Za-z]{2,}")


class Answer(NamedTuple):
    """The final-answer candidate: ``kind`` in {"boxed", "line", "text", "none"}."""

    kind: str
    text: str


class Verdict(NamedTuple):
    correct: bool
    boxed: bool  # a well-formed (closed, non-empty) final \boxed{}
    answered: bool  # an answer was found and parsed


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{}``/``\\fbox{}``; ``""`` if it is unclosed; None if absent."""
    start = None
    for start in _BOX_RE.finditer(text):
        pass
    if start is None:
        return None
    depth = 1
    for i in range(start.end(), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start.end() : i].strip()
    return ""


def find_answer(text: str, max_chars: int = 20_000, strict: bool = True) -> Answer:
    """Apply the extraction rules in the module docstring (rule 3 only when not ``strict``)."""
    text = text[-max_chars:]
    boxed = last_boxed(text)
    if boxed is not None:
        return Answer("boxed", boxed) if boxed else Answer("none", "")
    match = None
    for match in _ANSWER_RE.finditer(text):
        pass
    if match is not None:
        tail = match.group("tail") if match.group("tail") is not None else match.group("hash_tail")
        tail = tail.strip(" \t*")
        if not tail:  # "The answer is:\n$$5$$"
            rest = text[match.end() :].strip().split("\n", 1)[0]
            tail = rest.strip(" \t*")
        return Answer("line", tail) if tail else Answer("none", "")
    if strict or not text.strip():
        return Answer("none", "")
    return Answer("text", text)


# --------------------------------------------------------------------------- #
# Scoring one item (runs in a worker; callable in-process for tests).
# --------------------------------------------------------------------------- #


@lru_cache(maxsize=1)
def _mv():
    import math_verify

    # We disable math-verify's SIGALRM timeouts (see module docstring); mute its warning.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def _parse(text: str) -> list:
    return _mv().parse(text, parsing_timeout=None)


def _parse_line(tail: str) -> list:
    """An answer line: bare math is parsed as LaTeX, prose is left to math-verify."""
    is_prose = _WORD_RE.search(_LATEX_CMD_RE.sub(" ", tail)) is not None
    if is_prose or any(d in tail for d in _LATEX_DELIMS):
        return _parse(tail)
    return _parse("$" + tail.rstrip(" .") + "$")


@lru_cache(maxsize=4096)  # a group of G responses shares one ground truth
def _parse_gold(ground_truth: str) -> list:
    boxed = last_boxed(ground_truth)
    return _parse("\\boxed{" + (boxed or ground_truth) + "}")


THINK_END = "</think>"


def after_think(text: str) -> str | None:
    """The solution part of an R1-style response (``think=True``): the text after the first ``</think>``,
    up to a second one if any, as LUFFY's reward takes it (``text.split("</think>")[1]``); None when the
    response never closes its thinking (no answer)."""
    parts = text.split(THINK_END)
    return parts[1] if len(parts) > 1 else None


def score_one(response: str, ground_truth: str, max_chars: int = 20_000, strict: bool = True) -> Verdict:
    """Grade one response; the default worker function."""
    answer = find_answer(response, max_chars, strict)
    if answer.kind == "boxed":
        pred = _parse("\\boxed{" + answer.text + "}")
    elif answer.kind == "line":
        pred = _parse_line(answer.text)
    elif answer.kind == "text":
        pred = _parse(answer.text)
    else:
        pred = []
    gold = _parse_gold(ground_truth[:max_chars])
    correct = bool(pred) and bool(gold) and _mv().verify(gold, pred, timeout_seconds=None)
    return Verdict(correct=bool(correct), boxed=answer.kind == "boxed", answered=bool(pred))


_ARITHMETIC_RE = re.compile(r"[0-9eE\s.,+\-*/()]*")


def _eval_guard(stringify_expr: Callable) -> Callable:
    """Wrap sympy's ``stringify_expr`` (the step before ``eval`` in ``parse_expr``)."""

    def guarded(s, *args, **kwargs):
        if not _ARITHMETIC_RE.fullmatch(s) and not _in_module_import():
            raise ValueError(f"refusing to eval non-arithmetic text: {s[:60]!r}")
        return stringify_expr(s, *args, **kwargs)

    return guarded


def _in_module_import() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


# --------------------------------------------------------------------------- #
# Worker process.
# --------------------------------------------------------------------------- #

_WARMUP = [  # touches the lazily imported parts of sympy before the first timed item
    ("$x^2+2x+1$", "(x+1)^2"),
    ("\\boxed{(1, 2]}", "(1,2]"),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}"),
    ("The answer is 50%.", "0.5"),
    ("\\boxed{2\\pi}", "6.28"),
    ("\\boxed{\\frac{\\sqrt{3}}{3}}", "\\frac{1}{\\sqrt{3}}"),
]


def _worker_init(message: tuple) -> None:
    """Once per worker: the memory limit, sympy's lazy imports touched, the eval guard installed."""
    global _WORKER
    score_fn, max_chars, strict, memory_limit_mb = message
    if memory_limit_mb:
        import resource

        limit = memory_limit_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import sympy.physics.units  # noqa: F401  (module-level sympify of constant names)
    from sympy.parsing import sympy_parser

    for response, gold in _WARMUP:
        score_one(response, gold, max_chars, strict=False)  # rule 3 too: warm every parse path
    sympy_parser.stringify_expr = _eval_guard(sympy_parser.stringify_expr)
    _WORKER = (score_fn, max_chars, strict)


def _worker_score(task: list) -> list:
    score_fn, max_chars, strict = _WORKER
    try:
        return list(score_fn(*task, max_chars, strict))
    except Exception:  # noqa: BLE001  (MemoryError, RecursionError, ...): logged here, counted by the trainer
        logger.exception("math verifier item failed")
        raise


_WORKER: tuple = ()


def _worker_main(fd: int) -> None:
    """Entry point of a worker subprocess; ``fd`` is its end of a socket pair (``workers.serve``)."""
    workers.serve(fd, _worker_score, init=_worker_init)


# --------------------------------------------------------------------------- #
# The verifier.
# --------------------------------------------------------------------------- #


class MathVerifier:
    """``(responses, ground_truths) -> RewardResult`` for math answers.

    reward = ``correct_reward * correct + format_reward * boxed``, where ``boxed``
    means the final answer is a well-formed ``\\boxed{}``. ``strict`` (default)
    grades only a marked final answer (``\\boxed{}``, "answer is X", "#### X");
    ``strict=False`` also takes the rightmost number in the text (rule 3 above).
    ``think=True`` (R1-style responses, the prompt opening ``<think>``) grades only the text after the
    first ``</think>`` (``after_think``); a response without one has no answer (``info["no_think"]``).
    Items that time out or crash their worker score 0 and count in
    ``info["timeouts"]``/``info["errors"]``;
    ``info["no_answer"]`` counts responses in which no final answer was found.
    The worker pool lives until ``close()`` (or the ``with`` block ends) and is
    reused across calls. Not thread-safe.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        format_reward: float = 0.0,
        correct_reward: float = 1.0,
        *,
        strict: bool = True,
        think: bool = False,
        max_chars: int = 20_000,
        memory_limit_mb: int | None = 2048,
        startup_timeout_s: float = 120.0,
        _score_fn: Callable[[str, str, int, bool], Sequence] = score_one,  # test hook
    ):
        for key, value, ok, allowed in [
            ("timeout_s", timeout_s, timeout_s > 0, "> 0"),
            ("num_workers", num_workers, num_workers >= 1, ">= 1"),
            ("max_chars", max_chars, max_chars >= 1, ">= 1"),
            ("memory_limit_mb", memory_limit_mb, memory_limit_mb is None or memory_limit_mb >= 256,
             ">= 256 or None"),
        ]:
            if not ok:
                raise ValueError(f"MathVerifier: {key}={value!r}, must be {allowed}")
        self.timeout_s = float(timeout_s)
        self.format_reward = float(format_reward)
        self.correct_reward = float(correct_reward)
        self.max_chars = int(max_chars)
        self.strict = bool(strict)
        self.think = bool(think)
        self._pool = workers.WorkerPool("echorl_jax.rewards.math:_worker_main",
                                        (_score_fn, self.max_chars, self.strict, memory_limit_mb),
                                        num_workers=num_workers, timeout_s=self.timeout_s, name="math verifier",
                                        startup_timeout_s=startup_timeout_s)  # fmt: skip

    @property
    def _workers(self) -> list:
        return self._pool.workers

    def __call__(self, responses: Sequence[str], ground_truths: Sequence[str]) -> RewardResult:
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"MathVerifier: {len(responses)} responses but {len(ground_truths)} ground truths"
            )
        m = self.max_chars
        texts = [after_think(str(r)) if self.think else str(r) for r in responses]
        graded = [i for i, t in enumerate(texts) if t is not None]
        results = self._pool.run([(texts[i][-m:], str(ground_truths[i])[:m]) for i in graded])
        n = len(texts)
        reward_n = np.zeros(n, np.float32)
        correct_n = np.zeros(n, bool)
        info = {"timeouts": 0, "errors": 0, "no_answer": n - len(graded)}
        if self.think:
            info["no_think"] = n - len(graded)
        for i, res in zip(graded, results):
            if res == workers.TIMEOUT:
                info["timeouts"] += 1
            elif isinstance(res, workers.Failed):
                info["errors"] += 1
            else:
                v = Verdict(*res)
                correct_n[i] = v.correct
                reward_n[i] = self.correct_reward * v.correct + self.format_reward * v.boxed
                info["no_answer"] += not v.answered
        return RewardResult(reward_n=reward_n, correct_n=correct_n, info=info)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
