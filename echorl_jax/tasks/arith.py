"""Built-in verifiable task: left-to-right integer arithmetic on a running value.

A problem is a start value followed by ``steps`` operations, applied strictly
left to right (no precedence). The worked solution carries the running value
one operation per line and ends with an exactly checkable answer line::

    prompt:    "7 +5 -3 *2\\n"
    solution:  "7+5=12\\n12-3=9\\n9*2=18\\nanswer 18"
    ground_truth: "18"

The caller appends EOS to the solution for SFT. A ``steps``-step problem has
``steps + 1`` solution lines, so EchoRL's newline-delimited steps are exactly the
arithmetic steps plus the answer line.

Why this shape: a ~1M-parameter character-level model can partially learn it
in a few minutes of CPU SFT. Operands are 1..``max_operand`` and every
intermediate value stays in ``[1, max_value]`` (operations that would leave it
are never drawn), so each line is one small fact (<= 2-digit ± 1-digit, or a
small product), and difficulty grows with the number of steps: an error on any
line propagates to the answer.

Train/eval disjointness does not depend on seeds: a stable hash of the prompt
puts every problem in exactly one split (``eval_fraction`` of the problem space
goes to eval), so eval records from any seed never appear in train records
from any seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from typing import Sequence

import numpy as np

from echorl_jax.rewards.base import RewardResult

DATA_SOURCE = "arith"
SPLITS = ("train", "eval")
_OPS = "+-*"


@dataclasses.dataclass(frozen=True)
class ArithTask:
    """Config section of the built-in arithmetic task.

    min_steps / max_steps: difficulty range = number of operations (lines).
    max_operand:   operands and start value are drawn from 1..max_operand.
    max_value:     every running value stays in [1, max_value].
    ops:           allowed operators, a subset of "+-*".
    eval_fraction: share of the problem space reserved for the eval split.
    slip_rate:     chance that a line of a train record's worked solution slips: its result is off by
                   1..3 and the next lines carry the slipped value on, so the demonstrated answer is
                   wrong (``ground_truth`` stays the true answer). A warm start on slipping solutions
                   converges to a fallible teacher's accuracy, which RL on verified answers can then
                   raise. Eval records never slip; 0 keeps every solution exact.
    """

    min_steps: int = 1
    max_steps: int = 4
    max_operand: int = 9
    max_value: int = 99
    ops: str = "+-*"
    eval_fraction: float = 0.1
    slip_rate: float = 0.0

    def __post_init__(self):
        def bad(key, value, allowed):
            raise ValueError(f"ArithTask.{key}={value!r} is invalid: {allowed}.")

        if not 1 <= self.min_steps <= self.max_steps:
            bad("min_steps", self.min_steps, f"need 1 <= min_steps <= max_steps (max_steps={self.max_steps})")
        if self.max_operand < 1:
            bad("max_operand", self.max_operand, "need max_operand >= 1")
        if self.max_value < self.max_operand:
            bad("max_value", self.max_value, f"need max_value >= max_operand ({self.max_operand})")
        if not self.ops or any(o not in _OPS for o in self.ops) or len(set(self.ops)) != len(self.ops):
            bad("ops", self.ops, f"need a non-empty subset of {_OPS!r} without repeats")
        if not 0.0 < self.eval_fraction < 1.0:
            bad("eval_fraction", self.eval_fraction, "need 0 < eval_fraction < 1")
        if not 0.0 <= self.slip_rate < 1.0:
            bad("slip_rate", self.slip_rate, "need 0 <= slip_rate < 1")


# ----------------------------------------------------------------------------- generation


def _apply(value: int, op: str, k: int) -> int:
    if op == "+":
        return value + k
    if op == "-":
        return value - k
    return value * k


def _valid_operands(task: ArithTask, value: int, op: str) -> range:
    """Operands k in 1..max_operand that keep ``value op k`` inside [1, max_value].

    Zero is excluded: it is absorbing under "*", which would make "answer 0" a
    cheap guess that earns reward without doing the arithmetic.
    """
    hi = task.max_operand
    if op == "+":
        hi = min(hi, task.max_value - value)
    elif op == "-":
        hi = min(hi, value - 1)
    else:  # "*"
        hi = min(hi, task.max_value // value)
    return range(1, hi + 1)


def _sample_problem(rng: random.Random, task: ArithTask, steps: int) -> tuple[int, list[tuple[str, int]]]:
    # Only a restricted ``ops`` ("-" alone, "+" alone) can run out of valid
    # operations (value stuck at 1 or max_value); retry a bounded number of times.
    for _ in range(1000):
        start = value = rng.randint(1, task.max_operand)
        ops: list[tuple[str, int]] = []
        for _ in range(steps):
            choices = [(op, ks) for op in task.ops if (ks := _valid_operands(task, value, op))]
            if not choices:
                break
            op, ks = rng.choice(choices)
            k = rng.choice(ks)
            ops.append((op, k))
            value = _apply(value, op, k)
        else:
            return start, ops
    raise ValueError(f"arith: cannot build a {steps}-step problem within [1, {task.max_value}] using ops={task.ops!r}.")


def render(start: int, ops: Sequence[tuple[str, int]], slips: Sequence[int] = ()) -> tuple[str, str, int]:
    """``(prompt, solution, answer)`` of a problem; the solution has no trailing newline.

    ``answer`` is always the true value. ``slips[i]`` (when given) is added to line i's written result,
    and the solution carries the written value on (a teacher's slip): only the solution text changes.
    """
    prompt = " ".join([str(start)] + [f"{op}{k}" for op, k in ops]) + "\n"
    lines, written, value = [], start, start
    for i, (op, k) in enumerate(ops):
        value = _apply(value, op, k)
        new = _apply(written, op, k)
        slip = slips[i] if i < len(slips) else 0
        new = new + slip if new + slip >= 1 else new - slip  # a slip never writes below 1 (a value carried on from one may be)
        lines.append(f"{written}{op}{k}={new}")
        written = new
    lines.append(f"answer {written}")
    return prompt, "\n".join(lines), value


def draw_slips(rng: random.Random, steps: int, slip_rate: float) -> list[int]:
    """Per-line slips of a worked solution: 0, or with chance ``slip_rate`` a nonzero offset in ±1..3."""
    return [rng.choice((-3, -2, -1, 1, 2, 3)) if rng.random() < slip_rate else 0 for _ in range(steps)]


def is_eval_prompt(prompt: str, eval_fraction: float) -> bool:
    """Stable (process-independent) split assignment of a problem by its prompt."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
    return h / 2.0**64 < eval_fraction


def _record(prompt: str, solution: str, answer: int, steps: int) -> dict:
    return {
        "prompt": prompt,
        "ground_truth": str(answer),
        "data_source": DATA_SOURCE,
        "difficulty": steps,
        "solution": solution,
    }


def _draw(rng: random.Random, task: ArithTask, steps: int, split: str) -> tuple[str, str, int]:
    want_eval = split == "eval"
    for _ in range(10_000):  # rejection into the split's side of the hash partition
        prompt, solution, answer = render(*_sample_problem(rng, task, steps))
        if is_eval_prompt(prompt, task.eval_fraction) == want_eval:
            return prompt, solution, answer
    raise ValueError(f"arith: no {steps}-step {split} problem found; the problem space of {task} is too small.")


def _check_args(split: str, num: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"arith: split={split!r} is invalid; allowed: {SPLITS}.")
    if num < 0:
        raise ValueError(f"arith: num={num} must be >= 0.")


def make_records(task: ArithTask, split: str, num: int, seed: int) -> list[dict]:
    """``num`` records of ``split`` with difficulty uniform in [min_steps, max_steps].

    Deterministic per (task, split, seed). Problems may repeat within a split
    (the one-step space holds only a few hundred problems).
    """
    _check_args(split, num)
    rng = random.Random(f"arith/{split}/{seed}")
    # Slips draw from their own stream: slip_rate=0 leaves every record as it was without the option.
    slip_rng = random.Random(f"arith/{split}/{seed}/slips")
    out = []
    for _ in range(num):
        steps = rng.randint(task.min_steps, task.max_steps)
        record = _record(*_draw(rng, task, steps, split), steps)
        if split == "train" and task.slip_rate > 0:
            start, ops = parse_prompt(record["prompt"])
            record["solution"] = render(start, ops, draw_slips(slip_rng, steps, task.slip_rate))[1]
        out.append(record)
    return out


def parse_prompt(prompt: str) -> tuple[int, list[tuple[str, int]]]:
    """``(start, ops)`` of a prompt written by ``render``."""
    start, *ops = prompt.split()
    return int(start), [(o[0], int(o[1:])) for o in ops]


def make_eval_records(task: ArithTask, num_per_level: int, seed: int) -> list[dict]:
    """A held-out set balanced over difficulty: ``num_per_level`` records per level.

    Ordered by level. Prompts are unique within a level while the level's eval
    share of the problem space allows; small levels (e.g. one step) repeat their
    problems cyclically to keep the set balanced. Each level has its own RNG
    stream, so changing ``max_steps`` does not change the other levels' items.
    """
    _check_args("eval", num_per_level)
    out = []
    for steps in range(task.min_steps, task.max_steps + 1):
        rng = random.Random(f"arith/eval-balanced/{seed}/{steps}")
        seen: dict[str, tuple[str, str, int]] = {}
        for _ in range(50 * num_per_level):
            if len(seen) == num_per_level:
                break
            item = _draw(rng, task, steps, "eval")
            seen.setdefault(item[0], item)
        items = list(seen.values())
        out.extend(_record(*items[i % len(items)], steps) for i in range(num_per_level))
    return out


# ----------------------------------------------------------------------------- verification

# "answer 18", "Answer: -3", "the answer is 18." — never a decimal ("18.5") or a
# >18-digit run, which count as no answer.
_ANSWER_RE = re.compile(r"\banswer[ \t]*(?:is[ \t]+)?[:=]?[ \t]*(-?\d{1,18})(?!\d|\.\d)", re.IGNORECASE)


def extract_answer(text: str) -> int | None:
    """The integer of the last answer statement in ``text``, or None."""
    last = None
    for m in _ANSWER_RE.finditer(text):
        last = m
    return None if last is None else int(last.group(1))


class ArithVerifier:
    """Reward 1.0 when the last ``answer N`` equals the ground truth, else 0.0.

    info: ``no_answer`` (responses with no parseable answer), ``correct``.
    """

    def __call__(self, responses: Sequence[str], ground_truths: Sequence[str]) -> RewardResult:
        if len(responses) != len(ground_truths):
            raise ValueError(
                f"ArithVerifier: {len(responses)} responses but {len(ground_truths)} ground truths."
            )
        correct_n = np.zeros(len(responses), dtype=bool)
        no_answer = 0
        for i, (response, truth) in enumerate(zip(responses, ground_truths)):
            try:
                target = int(str(truth).strip())
            except ValueError:
                raise ValueError(f"ArithVerifier: ground truth {truth!r} (row {i}) is not an integer.") from None
            got = extract_answer(response)
            no_answer += got is None
            correct_n[i] = got == target
        return RewardResult(
            reward_n=correct_n.astype(np.float32),
            correct_n=correct_n,
            info={"no_answer": float(no_answer), "correct": float(correct_n.sum())},
        )
