"""Multiple-choice verifier: the response's option letter against the letter answer.

Letter extraction (the first rule that finds a letter decides; "last answer wins"
within a rule, as in the math verifier):
  1. the last ``\\boxed{...}``: ``\\boxed{C}``, ``\\boxed{(C)}``, ``\\boxed{\\text{C}}``,
     ``\\boxed{C. 42}``; a box that holds no option letter gives no answer;
  2. else the last "answer is (C)" / "answer is C" / "Answer: C" / "answer: **C**".
Without either marker there is no answer (score 0): a bare letter anywhere in the
text ("A function f...") is noise, not an answer. A letter outside the row's
options (``extra_info["choices"]``, else A-J as in MMLU-Pro) is not an answer.

Rows reach this verifier through the router: ``reward.name="auto"`` sends the
data_sources in ``CHOICE_SOURCES`` (written by ``echorl_jax.data_prep``) here;
other multiple-choice sets use ``reward.by_source=("NAME=choice",)``.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

import numpy as np

from echorl_jax.rewards.base import RewardResult
from echorl_jax.rewards.math import last_boxed

CHOICE_SOURCES = ("arc_c", "gpqa_diamond", "mmlu_pro")  # data_prep's multiple-choice sets
LETTERS = string.ascii_uppercase
DEFAULT_NUM_CHOICES = 10  # MMLU-Pro's A-J, when a row does not say

# In a box: optional \text{...}/\textbf{...} and parentheses around one letter, then an end or a separator.
_BOXED_LETTER = re.compile(r"^(?:\\text(?:bf)?\{)?\s*\(?([A-Z])\)?\}?(?:$|[\s.:)\]}])")
_ANSWER_LETTER = re.compile(r"answer(?:\s+is)?\s*[:：]?\s*(?:\*\*|\$)?\s*(?:\\text\{)?\(?([A-Z])\)?(?![A-Za-z])",
                            re.IGNORECASE)  # fmt: skip


def find_letter(response: str) -> str | None:
    """The option letter the response gives as its answer, or None (see the module docstring)."""
    boxed = last_boxed(response)
    if boxed is not None:
        m = _BOXED_LETTER.match(boxed.strip())
        return m.group(1) if m else None
    found = None
    for m in _ANSWER_LETTER.finditer(response):
        if m.group(1).isupper():  # "answer is a prime" is prose, not option A
            found = m.group(1)
    return found


def num_choices(extra_info: dict | None) -> int:
    choices = (extra_info or {}).get("choices")
    return len(choices) if isinstance(choices, (list, tuple)) and choices else DEFAULT_NUM_CHOICES


class ChoiceVerifier:
    """``(responses, letters, rows) -> RewardResult``: reward 1 for the right letter, else 0."""

    takes_rows = True

    def __init__(self, correct_reward: float = 1.0):
        self.correct_reward = correct_reward

    def __call__(self, responses: Sequence[str], ground_truths: Sequence[str], rows=None) -> RewardResult:
        correct_n = np.zeros(len(responses), bool)
        no_answer = 0
        for i, (text, truth) in enumerate(zip(responses, ground_truths)):
            gold = str(truth).strip().strip("()").upper()
            if len(gold) != 1 or gold not in LETTERS:
                raise ValueError(f"choice verifier: ground truth {truth!r} is not an option letter (A, B, C, ...)")
            letter = find_letter(text)
            n = num_choices(rows[i].extra_info if rows is not None else None)
            if letter is None or LETTERS.index(letter) >= n:
                no_answer += 1
                continue
            correct_n[i] = letter == gold
        reward_n = np.where(correct_n, self.correct_reward, 0.0).astype(np.float32)
        return RewardResult(reward_n=reward_n, correct_n=correct_n, info={"choice_no_answer": float(no_answer)})
