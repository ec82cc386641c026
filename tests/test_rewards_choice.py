"""Multiple-choice grading: letter extraction and the option range."""

import pytest

from echorl_jax.rewards import RewardRow, get_verifier
from echorl_jax.rewards.choice import find_letter


@pytest.mark.parametrize("text,letter", [
    ("... so the answer is (C).", "C"),
    ("The answer is C", "C"),
    ("Answer: C", "C"),
    ("answer: **D**", "D"),
    ("Thus \\boxed{C}", "C"),
    ("Thus \\boxed{(B)}", "B"),
    ("Thus \\boxed{\\text{A}}", "A"),
    ("Thus \\boxed{B. 42}", "B"),
    ("Answer: A, wait, the answer is (D)", "D"),  # last answer wins
    ("\\boxed{C} hmm, Answer: A", "C"),  # a box outranks prose
    ("\\boxed{42}", None),  # a box without a letter is no answer
    ("A function f is given.", None),  # a bare letter is not an answer
    ("The answer is a prime.", None),
])  # fmt: skip
def test_find_letter(text, letter):
    assert find_letter(text) == letter


def test_verifier_grades_letters_within_the_rows_options():
    v = get_verifier("choice")
    rows = [RewardRow("gpqa_diamond", {"choices": ["a", "b", "c", "d"]}, None, 0)] * 3 + [RewardRow("mmlu_pro", {}, None, 1)]
    res = v(["\\boxed{D}", "The answer is (E)", "nothing", "Answer: J"], ["D", "E", "A", "j"], rows)
    assert res.correct_n.tolist() == [True, False, False, True]  # E is outside A-D; MMLU-Pro default A-J
    assert res.reward_n.tolist() == [1.0, 0.0, 0.0, 1.0] and res.info["choice_no_answer"] == 2
    with pytest.raises(ValueError, match="not an option letter"):
        v(["\\boxed{A}"], ["42"], rows[:1])
