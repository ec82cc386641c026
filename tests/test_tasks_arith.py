"""The built-in arithmetic task, its verifier and the character tokenizer."""

import operator
import random
import re
import string

import numpy as np
import pytest
from transformers import AutoTokenizer

from echorl_jax.tasks.arith import (
    ArithTask,
    ArithVerifier,
    extract_answer,
    make_eval_records,
    make_records,
)
from echorl_jax.tasks.tokenizer import build_char_tokenizer

_OP = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_PROMPT_RE = re.compile(r"(\d+)((?: [+\-*]\d+)+)\n")
_LINE_RE = re.compile(r"(\d+)([+\-*])(\d+)=(\d+)")


def _reference(prompt):
    """Independent left-to-right evaluation of a prompt: (start, [(op, k)], values)."""
    m = _PROMPT_RE.fullmatch(prompt)
    assert m, prompt
    ops = [(t[0], int(t[1:])) for t in m.group(2).split()]
    values = [int(m.group(1))]
    for op, k in ops:
        values.append(_OP[op](values[-1], k))
    return int(m.group(1)), ops, values


# ----------------------------------------------------------------------------- generator


def test_deterministic_per_seed_and_seeds_differ():
    task = ArithTask()
    for split in ("train", "eval"):
        a = make_records(task, split, 100, seed=3)
        assert a == make_records(task, split, 100, seed=3)
        assert [r["prompt"] for r in a] != [r["prompt"] for r in make_records(task, split, 100, seed=4)]
    assert make_eval_records(task, 10, seed=0) == make_eval_records(task, 10, seed=0)
    assert make_eval_records(task, 10, seed=0) != make_eval_records(task, 10, seed=1)


def test_record_fields_and_difficulty_range():
    task = ArithTask(min_steps=2, max_steps=5)
    recs = make_records(task, "train", 400, seed=0)
    assert {r["difficulty"] for r in recs} == {2, 3, 4, 5}
    for r in recs:
        assert set(r) == {"prompt", "ground_truth", "data_source", "difficulty", "solution"}
        assert r["data_source"] == "arith"
        assert isinstance(r["ground_truth"], str) and isinstance(r["difficulty"], int)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5])
def test_solutions_are_right_and_have_one_line_per_step(steps):
    task = ArithTask(min_steps=steps, max_steps=steps)
    for r in make_records(task, "train", 200, seed=steps) + make_records(task, "eval", 50, seed=steps):
        start, ops, values = _reference(r["prompt"])
        assert r["difficulty"] == steps and len(ops) == steps
        lines = r["solution"].split("\n")
        assert len(lines) == steps + 1 and not r["solution"].endswith("\n")
        for i, (line, (op, k)) in enumerate(zip(lines[:-1], ops)):
            a, line_op, b, c = _LINE_RE.fullmatch(line).groups()
            assert (int(a), line_op, int(b), int(c)) == (values[i], op, k, values[i + 1])
            assert _OP[line_op](int(a), int(b)) == int(c)
        assert lines[-1] == f"answer {values[-1]}"
        assert r["ground_truth"] == str(values[-1])
        assert 1 <= start <= task.max_operand
        assert all(1 <= k <= task.max_operand for _, k in ops)
        assert all(1 <= v <= task.max_value for v in values)


def test_slipping_solutions_carry_their_slips_on_and_keep_the_true_answer():
    """task.slip_rate: a train solution's line may write a result off by 1..3; the next line starts from the
    written value and the answer line states the last one, while ground_truth stays the prompt's true value.
    Prompts are the exact task's; eval records never slip; the slip share matches the rate (binomial bound)."""
    exact, slipping = ArithTask(min_steps=2, max_steps=4), ArithTask(min_steps=2, max_steps=4, slip_rate=0.2)
    plain, noisy = make_records(exact, "train", 2000, seed=3), make_records(slipping, "train", 2000, seed=3)
    assert [r["prompt"] for r in plain] == [r["prompt"] for r in noisy]
    assert [r["ground_truth"] for r in plain] == [r["ground_truth"] for r in noisy]
    assert make_records(slipping, "eval", 300, seed=3) == make_records(exact, "eval", 300, seed=3)
    slipped_lines = total_lines = wrong_answers = 0
    for r in noisy:
        start, ops, values = _reference(r["prompt"])
        lines = r["solution"].split("\n")
        written = start
        for line, (op, k) in zip(lines[:-1], ops):
            # a slipped value carried on may leave [1, max_value] (the teacher's own arithmetic from it)
            a, line_op, b, c = re.fullmatch(r"(-?\d+)([+\-*])(\d+)=(-?\d+)", line).groups()
            assert (int(a), line_op, int(b)) == (written, op, k)
            slip = int(c) - _OP[op](written, k)
            assert slip == 0 or (1 <= abs(slip) <= 3 and (int(c) >= 1 or _OP[op](written, k) < 1))  # never to < 1
            slipped_lines += slip != 0
            total_lines += 1
            written = int(c)
        assert lines[-1] == f"answer {written}" and r["ground_truth"] == str(values[-1])
        wrong_answers += written != values[-1]
    rate = slipped_lines / total_lines
    assert abs(rate - 0.2) < 4 * (0.2 * 0.8 / total_lines) ** 0.5, rate
    assert wrong_answers > 0.3 * len(noisy)  # 1 - 0.8^3 of the answers, less the rare slips that cancel


def test_knobs_respected():
    task = ArithTask(min_steps=3, max_steps=3, max_operand=5, max_value=20, ops="+-")
    for r in make_records(task, "train", 300, seed=1):
        _, ops, values = _reference(r["prompt"])
        assert {op for op, _ in ops} <= {"+", "-"}
        assert all(k <= 5 for _, k in ops) and all(1 <= v <= 20 for v in values)


def test_train_and_eval_are_disjoint():
    task = ArithTask(min_steps=1, max_steps=3)
    train = {r["prompt"] for s in range(3) for r in make_records(task, "train", 3000, seed=s)}
    evals = {r["prompt"] for s in range(3) for r in make_records(task, "eval", 300, seed=s)}
    evals |= {r["prompt"] for s in range(3) for r in make_eval_records(task, 50, seed=s)}
    # The one-step space has ~200 problems: train covers nearly all of its side,
    # so a leaky partition would show up here.
    assert sum(p.count(" ") == 1 for p in train) > 150
    assert sum(p.count(" ") == 1 for p in evals) > 5
    assert not train & evals


def test_eval_records_balanced():
    task = ArithTask(min_steps=1, max_steps=4)
    recs = make_eval_records(task, 40, seed=0)
    assert [r["difficulty"] for r in recs] == [d for d in range(1, 5) for _ in range(40)]
    for d in range(2, 5):  # large levels: unique prompts
        assert len({r["prompt"] for r in recs if r["difficulty"] == d}) == 40
    one_step = {r["prompt"] for r in recs if r["difficulty"] == 1}
    assert 5 < len(one_step) <= 40  # small level: all its eval problems, repeated
    for r in recs:
        assert _reference(r["prompt"])[2][-1] == int(r["ground_truth"])


@pytest.mark.parametrize(
    "kwargs",
    [dict(min_steps=0), dict(min_steps=3, max_steps=2), dict(ops="+/"), dict(ops=""), dict(eval_fraction=1.0),
     dict(max_operand=0), dict(max_value=5), dict(slip_rate=-0.1), dict(slip_rate=1.0)],
)
def test_bad_config_raises(kwargs):
    with pytest.raises(ValueError, match="ArithTask"):
        ArithTask(**kwargs)


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        make_records(ArithTask(), "test", 1, 0)


# ----------------------------------------------------------------------------- verifier


def test_verifier_cases():
    v = ArithVerifier()
    cases = [
        ("7+5=12\nanswer 12", "12", 1.0),  # right
        ("7+5=13\nanswer 13", "12", 0.0),  # wrong
        ("7+5=12\n", "12", 0.0),  # missing answer line
        ("answer twelve", "12", 0.0),  # malformed
        ("answer 12.5", "12", 0.0),  # not an integer
        ("answer", "12", 0.0),
        ("", "12", 0.0),
        ("so the Answer: 12. done", "12", 1.0),  # surrounding text
        ("blah\nthe answer is 12!\n", "12", 1.0),
        ("answer 12\nanswer 13", "12", 0.0),  # several answers: the last wins
        ("answer 13\nanswer 12", "12", 1.0),
        ("answer -4", "-4", 1.0),
        ("answer 12", " 12 ", 1.0),
        ("answer " + "9" * 5000, "12", 0.0),  # huge number: no answer, no crash
        ("__import__('os')\nanswer 3", "3", 1.0),  # text is parsed, never run
    ]
    res = v([c[0] for c in cases], [c[1] for c in cases])
    np.testing.assert_array_equal(res.reward_n, np.array([c[2] for c in cases], np.float32))
    assert res.reward_n.dtype == np.float32 and res.correct_n.dtype == bool
    np.testing.assert_array_equal(res.correct_n, res.reward_n > 0)
    assert res.info["no_answer"] == 6
    assert res.info["correct"] == sum(c[2] for c in cases)


def test_verifier_on_generated_solutions():
    recs = make_records(ArithTask(max_steps=5), "train", 300, seed=0)
    truths = [r["ground_truth"] for r in recs]
    assert ArithVerifier()([r["solution"] for r in recs], truths).reward_n.tolist() == [1.0] * 300
    off_by_one = [r["solution"].rsplit(" ", 1)[0] + f" {int(t) + 1}" for r, t in zip(recs, truths)]
    assert ArithVerifier()(off_by_one, truths).reward_n.tolist() == [0.0] * 300


def test_verifier_errors():
    with pytest.raises(ValueError, match="ground truths"):
        ArithVerifier()(["answer 1"], [])
    with pytest.raises(ValueError, match="not an integer"):
        ArithVerifier()(["answer 1"], ["one"])
    assert extract_answer("answer 3 and answer 4") == 4


# ----------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _random_texts(n=200):
    rng = random.Random(0)
    alphabet = string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", "")
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]
    return texts + [alphabet, "  a  b \n\n c .  , ' ? ! ", " leading", "trailing ", "\n"]


def test_tokenizer_round_trip(tok):
    recs = make_records(ArithTask(max_steps=5), "train", 50, seed=0)
    for s in _random_texts() + [r["prompt"] + r["solution"] for r in recs]:
        ids = tok.encode(s)
        assert len(ids) == len(s)  # one token per character, nothing added
        assert tok.decode(ids) == s


def test_tokenizer_specials_and_newline(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert tok.padding_side == "left"
    assert len(tok) == 101
    nl = tok.encode("\n")
    assert len(nl) == 1
    assert [i for i in range(len(tok)) if "\n" in tok.decode([i])] == nl
    assert [i for t, i in tok.get_vocab().items() if "\n" in t] == nl
    assert tok.encode("a\nb") == [tok.convert_tokens_to_ids("a"), nl[0], tok.convert_tokens_to_ids("b")]
    assert tok.decode([tok.bos_token_id, *tok.encode("1+2"), tok.eos_token_id], skip_special_tokens=True) == "1+2"
    assert tok.encode("é") == [tok.unk_token_id]
    batch = tok(["12", "1234"], padding=True)
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0] == [0, 0, 1, 1]


def test_tokenizer_save_reload(tmp_path, tok):
    build_char_tokenizer(str(tmp_path))
    re_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert re_tok.get_vocab() == tok.get_vocab()
    assert (re_tok.pad_token_id, re_tok.bos_token_id, re_tok.eos_token_id) == (0, 1, 2)
    assert re_tok.padding_side == "left"
    assert not re_tok.chat_template
    for s in _random_texts(50):
        assert re_tok.encode(s) == tok.encode(s)
        assert re_tok.decode(re_tok.encode(s)) == s
