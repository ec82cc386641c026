"""MathVerifier: grading table, extraction rules, eval safety, timeouts and crashes."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from echorl_jax.rewards import VERIFIERS, MathVerifier, get_verifier, math as rmath

# (id, response, ground truth, correct). Expected values are the right grades.
CASES = [
    ("frac_vs_decimal", r"So $x = \boxed{\frac{1}{2}}$.", "0.5", True),
    ("decimal_vs_frac", r"\boxed{0.5}", r"\frac{1}{2}", True),
    ("gold_frac_shorthand", r"\boxed{0.5}", r"\frac12", True),
    ("nested_braces", r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", True),
    ("nested_box", r"\boxed{\boxed{7}}", "7", True),
    ("fbox", r"\fbox{7}", "7", True),
    ("last_box_wins", r"First \boxed{3}, but wait, it is \boxed{4}.", "4", True),
    ("earlier_box_ignored", r"First \boxed{3}, but wait, it is \boxed{4}.", "3", False),
    ("adjacent_boxes_last_wins", r"\boxed{3} and \boxed{4}", "4", True),
    ("unclosed_last_box", r"\boxed{3} Hmm, actually \boxed{4", "3", False),
    ("answer_is_with_units", "The answer is 12 cm.", "12", True),
    ("answer_colon", "Answer: 12", "12", True),
    ("answer_bare_latex", r"Final answer: \frac{3}{4}", "0.75", True),
    ("answer_bare_sqrt", r"The answer is \sqrt{2}", r"\sqrt{2}", True),
    ("answer_on_next_line", "The final answer is:\n$$\\frac{7}{2}$$", "3.5", True),
    ("last_answer_line_wins", "The answer is 5.\nWait, no. The answer is 6.", "6", True),
    ("gsm8k_hashes", "3 + 4 = 7 apples\n#### 7", "7", True),
    ("markdown_bold_answer", "**Answer:** 42", "42", True),
    ("boxed_text_units", r"\boxed{12 \text{ cm}}", "12", True),
    ("set_any_order", r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", True),
    ("interval", r"\boxed{(1, 2]}", "(1,2]", True),
    ("interval_wrong_ends", r"\boxed{[1, 2)}", "(1,2]", False),
    ("interval_infinite", r"\boxed{(-\infty, 3)}", r"(-\infty, 3)", True),
    ("negative", r"\boxed{-3}", "-3", True),
    ("sign_error", r"\boxed{3}", "-3", False),
    ("negative_fraction", r"\boxed{-\frac{2}{3}}", r"-\frac23", True),
    ("answer_is_negative", "The answer is -5.", "-5", True),
    ("wrong", r"\boxed{4}", "5", False),
    ("decimal_not_close_enough", r"\boxed{0.333}", r"\frac{1}{3}", False),
    ("empty_output", "", "5", False),
    ("no_answer", "I am not sure how to solve this.", "5", False),
    ("empty_box", r"\boxed{}", "5", False),
    ("dfrac", r"\boxed{\dfrac{3}{4}}", r"\frac{3}{4}", True),
    ("percent_vs_number", r"\boxed{50\%}", "50", True),
    ("percent_vs_fraction", r"\boxed{50\%}", "0.5", True),
    ("answer_is_percent", "The answer is 50%.", "50", True),
    ("comma_thousands", r"\boxed{1,000}", "1000", True),
    ("comma_thousands_text", "The answer is 12,345,678.", "12345678", True),
    ("gold_with_commas", r"\boxed{1000}", "1,000", True),
    ("comma_list_is_not_number", r"\boxed{1,2,3}", "123", False),
    ("symbolic_expand", r"\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("pi", r"\boxed{2\pi}", r"2\pi", True),
    ("pi_approximation", r"\boxed{6.28}", r"2\pi", False),
    ("radical_simplified", r"\boxed{\sqrt{8}}", r"2\sqrt{2}", True),
    ("equation_rhs", r"\boxed{x=3}", "3", True),
    ("plain_last_expression", "3 + 4 = 7", "7", False),  # no answer marker: strict (default) ignores it
    ("mixed_number", r"\boxed{3\frac{1}{2}}", "3.5", True),
    ("power", r"\boxed{2^{10}}", "1024", True),
    ("degrees", r"\boxed{45^\circ}", "45", True),
    ("dollars", r"The total is \boxed{\$18.90}.", "18.90", True),
    ("choice_letter", r"\boxed{\text{(B)}}", "B", True),
    ("wrong_choice", r"\boxed{A}", "B", False),
    ("wrong_word", r"\boxed{\text{Tuesday}}", r"\text{Monday}", False),
    ("plus_minus", r"\boxed{\pm 2}", r"\{-2, 2\}", True),
]
NO_ANSWER_IDS = {"unclosed_last_box", "empty_output", "no_answer", "empty_box", "plain_last_expression"}

# math-verify 0.9.0 grades these wrongly (found while building this table); we keep the
# right grade and mark them, so a math-verify upgrade that fixes them shows up (strict).
MATH_VERIFY_MISSES = [
    ("thin_space_thousands", r"\boxed{1\,000}", "1000", True),  # parsed as 1*0
    ("repeating_decimal", r"\boxed{0.\overline{3}}", r"\frac13", True),  # not parsed
    ("varnothing", r"\boxed{\varnothing}", r"\emptyset", True),  # a symbol, not the empty set
]


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(timeout_s=20.0, num_workers=2) as v:  # generous: shared CI cores
        yield v


# A test-only worker function: the worker imports it from this module by name.
def hooked_score(response: str, ground_truth: str, max_chars: int, strict: bool):
    if response == "CRASH":
        os._exit(3)
    if response == "RAISE":
        raise RuntimeError("injected")
    if response == "RLIMIT_AS":
        import resource

        return [resource.getrlimit(resource.RLIMIT_AS)[0] == 2048 << 20, False, True]  # default
    return rmath.score_one(response, ground_truth, max_chars, strict)


@pytest.fixture(scope="module")
def hooked():
    kwargs = dict(timeout_s=1.0, num_workers=1, format_reward=0.25, _score_fn=hooked_score)
    with MathVerifier(**kwargs) as v:
        yield v


TABLE = [pytest.param(*c[1:], id=c[0]) for c in CASES] + [
    pytest.param(*c[1:], id=c[0], marks=pytest.mark.xfail(strict=True)) for c in MATH_VERIFY_MISSES
]


@pytest.mark.parametrize("response,ground_truth,correct", TABLE)
def test_grading_table(request, verifier, response, ground_truth, correct):
    res = verifier([response], [ground_truth])
    assert res.correct_n.tolist() == [correct]
    assert res.reward_n.tolist() == [float(correct)]
    assert res.reward_n.dtype == np.float32 and res.correct_n.dtype == bool
    no_answer = int(request.node.callspec.id in NO_ANSWER_IDS)
    assert res.info == {"timeouts": 0, "errors": 0, "no_answer": no_answer}


def test_batch_keeps_order_and_counts(verifier):
    assert len(CASES) >= 30
    ids, responses, golds, expected = zip(*CASES)
    res = verifier(list(responses), list(golds))
    assert res.correct_n.tolist() == list(expected)
    assert res.info == {"timeouts": 0, "errors": 0, "no_answer": len(NO_ANSWER_IDS)}
    reversed_res = verifier(list(responses)[::-1], list(golds)[::-1])
    assert reversed_res.correct_n.tolist() == list(expected)[::-1]


def test_find_answer_rules():
    fa = rmath.find_answer
    assert fa(r"a \boxed{\frac{1}{2}} b \boxed{x^{2}}.") == ("boxed", "x^{2}")
    assert fa(r"\boxed{1} then \boxed{2") == ("none", "")  # cut off mid-answer
    assert fa(r"The answer is 3. \boxed{ }") == ("none", "")
    assert fa("The answer is 3.\nso the answer: 4") == ("line", "4")
    assert fa("The answer is:\n\n  $5$\nDone.") == ("line", "$5$")
    assert fa("**Final Answer**: 9") == ("line", "9")
    assert fa("work\n#### 1,200") == ("line", "1,200")
    assert fa("we get 2 + 2 = 4") == ("none", "")  # strict: no marker, no answer
    assert fa("we get 2 + 2 = 4", strict=False) == ("text", "we get 2 + 2 = 4")
    assert fa("   ", strict=False) == ("none", "")
    assert fa("x" * 50 + r"\boxed{5}", max_chars=9) == ("boxed", "5")
    assert fa(r"\boxed{5}" + "x" * 50, max_chars=20) == ("none", "")
    assert fa(r"\boxed{5}" + "x" * 50, max_chars=20, strict=False) == ("text", "x" * 20)


def test_long_responses_are_truncated_to_their_tail(verifier):
    junk = "blah " * 200_000  # 1M chars
    res = verifier([junk + r"\boxed{7}", r"\boxed{7}" + junk], ["7", "7"])
    assert res.correct_n.tolist() == [True, False]
    assert res.info["no_answer"] == 1  # the early box was cut off with the head


def test_format_reward(hooked):
    res = hooked([r"\boxed{2}", r"\boxed{3}", "The answer is 2", "nothing here"], ["2"] * 4)
    np.testing.assert_allclose(res.reward_n, [1.25, 0.25, 1.0, 0.0])
    assert res.correct_n.tolist() == [True, False, True, False]


def test_pathological_input_times_out(hooked):
    tower = r"\boxed{9^{9^{9^{9^{9}}}}}"  # hangs in C big-int code without a hard limit
    responses = [r"\boxed{5}", tower, r"\boxed{4}", "", "The answer is 7"]
    t0 = time.monotonic()
    res = hooked(responses, ["5", "1", "5", "5", "7"])
    elapsed = time.monotonic() - t0
    assert res.correct_n.tolist() == [True, False, False, False, True]
    np.testing.assert_allclose(res.reward_n, [1.25, 0.0, 0.25, 0.0, 1.0])  # timed out: 0, no format
    assert res.info == {"timeouts": 1, "errors": 0, "no_answer": 1}
    assert elapsed < 30.0  # 1 s limit + worker restart on a loaded machine; a hang is forever
    again = hooked([r"\boxed{9}"], ["9"])  # the replaced worker serves later calls
    assert again.correct_n.tolist() == [True]


def test_crashed_worker_is_replaced(hooked):
    pid = hooked._workers[0].popen.pid
    res = hooked([r"\boxed{1}", "CRASH", r"\boxed{3}"], ["1", "2", "3"])
    assert res.correct_n.tolist() == [True, False, True]
    assert res.reward_n[1] == 0.0
    assert res.info == {"timeouts": 0, "errors": 1, "no_answer": 0}
    assert hooked._workers[0].popen.pid != pid
    pid = hooked._workers[0].popen.pid
    res = hooked(["RAISE", r"\boxed{2}"], ["1", "2"])  # an exception is caught in the worker
    assert res.correct_n.tolist() == [False, True]
    assert res.info["errors"] == 1
    assert hooked._workers[0].popen.pid == pid


def test_worker_memory_is_limited(hooked):
    assert hooked(["RLIMIT_AS"], ["0"]).correct_n.tolist() == [True]


def test_eval_guard_blocks_code_and_allows_arithmetic(monkeypatch):
    import sympy
    from sympy.parsing import sympy_parser

    guarded = rmath._eval_guard(sympy_parser.stringify_expr)
    monkeypatch.setattr(sympy_parser, "stringify_expr", guarded)
    with pytest.raises(ValueError, match="refusing to eval"):
        sympy.sympify("__import__('os').getcwd()")
    with pytest.raises(ValueError, match="refusing to eval"):
        sympy.parse_expr("exec(chr(49))")
    assert sympy.sympify("(1 + 2.5)*2/7") == sympy.Float(1.0)
    assert sympy.Number("1234") == 1234


def test_math_verify_only_evals_arithmetic(monkeypatch):
    """Every string that reaches sympy's eval while grading is digits and operators."""
    from sympy.parsing import sympy_parser

    seen = []
    orig = sympy_parser.stringify_expr

    def spy(s, *args, **kwargs):
        if not rmath._in_module_import():
            seen.append(s)
        return orig(s, *args, **kwargs)

    monkeypatch.setattr(sympy_parser, "stringify_expr", spy)
    attacks = [
        r"\boxed{__import__('os').system('echo pwned')}",
        "The answer is __import__('os').getcwd()",
        "answer: exec(chr(49)+chr(43)+chr(49))",
        "so it is (lambda: 1)() = 2*3",
    ]
    for _, response, gold, _ in CASES + MATH_VERIFY_MISSES:
        rmath.score_one(response, gold)
    for response in attacks:
        assert not rmath.score_one(response, "1").correct
    assert seen, "the spy saw nothing: the hook point moved"
    assert [s for s in seen if not rmath._ARITHMETIC_RE.fullmatch(s)] == []


def test_attacks_score_zero_in_workers(verifier, tmp_path):
    canary = tmp_path / "pwned"
    cmd = f"__import__('os').system('touch {canary}')"
    res = verifier([rf"\boxed{{{cmd}}}", f"The answer is {cmd}", cmd], ["0", "0", "0"])
    assert res.correct_n.tolist() == [False, False, False]
    assert not canary.exists()


def test_close_stops_workers():
    v = MathVerifier(num_workers=1)
    procs = [w.popen for w in v._workers]
    with v:
        assert v([r"\boxed{1}"], ["1"]).correct_n.tolist() == [True]
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        v([r"\boxed{1}"], ["1"])
    v.close()  # idempotent


def test_registry_and_validation():
    assert VERIFIERS["math"] is MathVerifier
    with pytest.raises(ValueError, match="unknown verifier 'nope'.*math"):
        get_verifier("nope")
    with pytest.raises(ValueError, match="timeout_s=0"):
        get_verifier("math", timeout_s=0)
    with pytest.raises(ValueError, match="num_workers=0"):
        MathVerifier(num_workers=0)


RANDOM_OUTPUT = "marbles 1/5 3M the tot"  # an untrained model's noise; its rightmost number is 3


def test_strict_requires_an_answer_marker(verifier):
    assert verifier.strict
    res = verifier([RANDOM_OUTPUT, "The answer is 3", r"so \boxed{3}", "answer: 3", "#### 3", "3 + 4 = 7"], ["3"] * 6)
    assert res.correct_n.tolist() == [False, True, True, True, True, False]
    assert res.info["no_answer"] == 2


def test_loose_mode_reenables_whole_text_fallback():
    assert rmath.score_one(RANDOM_OUTPUT, "3").correct is False
    assert rmath.score_one(RANDOM_OUTPUT, "3", strict=False).correct is True
    with MathVerifier(num_workers=1, timeout_s=20.0, strict=False) as loose:
        res = loose([RANDOM_OUTPUT, "3 + 4 = 7", r"\boxed{4}"], ["3", "7", "3"])
    assert res.correct_n.tolist() == [True, True, False]
