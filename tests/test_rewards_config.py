"""The ``reward`` config section: validation, math options, the custom hook and data_source routing."""

from __future__ import annotations

import os
import textwrap

import jax
import numpy as np
import pytest

from echorl_jax import config as config_lib
from echorl_jax.data.pipeline import PromptBatch
from echorl_jax.rewards import VERIFIERS, RewardResult, RewardRow, build_router, call_verifier
from echorl_jax.rewards.custom import RewardFnError
from echorl_jax.sampling.sampler import Rollout
from echorl_jax.trainer import grading, rollout
from echorl_jax.trainer.setup import default_verifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANDOM_OUTPUT = "marbles 1/5 3M the tot"  # the trial's random-model output; rightmost number 3


def cfg_of(**reward):
    return config_lib.build_config({"reward": reward})


def rows_of(*sources):
    return [RewardRow(s, {}, None, i) for i, s in enumerate(sources)]


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "reward,match",
    [
        (dict(name="nope"), r"reward.name='nope'.*known verifiers: auto, arith, choice, custom, math"),
        (dict(by_source=("gsm8k=nope",)), r"gsm8k=nope.*unknown verifier 'nope'"),
        (dict(by_source=("gsm8k",)), r"by_source entry 'gsm8k'.*SOURCE=VERIFIER"),
        (dict(name="custom"), r"reward.custom is empty"),
        (dict(custom="mod:fn"), r"reward.custom='mod:fn' is set but unused"),
        (dict(name="custom", custom="no/such/file.py:fn"), r"file 'no/such/file.py' does not exist"),
        (dict(name="custom", custom="just_a_module"), r"expected 'path/to/file.py:function'"),
        (dict(name="arith", format_reward=0.5), r"reward.format_reward is set but no row is graded by the math"),
        (dict(timeout_s=0), r"reward.timeout_s=0.0 must be > 0"),
        (dict(num_workers=0), r"reward.num_workers=0 must be >= 1"),
        (dict(custom_timeout_s=5.0), r"reward.custom_timeout_s is set but reward.custom is empty"),
        (dict(name="custom", custom="os.path:isabs", custom_timeout_s=-1), r"custom_timeout_s=-1.0 must be >= 0"),
        (dict(name="custom", custom="os.path:isabs", custom_workers=0), r"custom_workers=0 must be >= 1"),
    ],
)
def test_bad_reward_config_fails_at_validation(reward, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        cfg_of(**reward)


def test_math_options_on_data_without_math_rows_are_refused():
    """reward.name=auto sends the built-in task's rows to arith: a math option set there would do nothing."""
    from echorl_jax.rewards.router import check_against_data

    strict_off = cfg_of(strict=False).reward
    with pytest.raises(ValueError, match=r"reward.strict is set but no row of the data.*arith -> arith"):
        check_against_data(strict_off, ["arith", "arith"])
    check_against_data(strict_off, ["arith", "gsm8k"])  # gsm8k rows are graded by math
    check_against_data(cfg_of().reward, ["arith"])  # nothing set, nothing to refuse
    routed = cfg_of(by_source=("gsm8k=arith",), format_reward=0.5).reward
    with pytest.raises(ValueError, match=r"reward.format_reward.*gsm8k -> arith"):
        check_against_data(routed, ["gsm8k"])


def test_by_source_pattern_matching_no_data_source_is_refused_and_the_table_is_returned():
    """A typo'd pattern (easy_mul_v2 for easy_mul) would route nothing and grade everything by math."""
    from echorl_jax.rewards.router import check_against_data

    typo = cfg_of(by_source=("easy_mul_v2=math",)).reward
    with pytest.raises(ValueError, match=r"by_source entry 'easy_mul_v2=math' matches no data_source.*"
                                         r"easy_mul -> math, gsm8k -> math"):
        check_against_data(typo, ["gsm8k", "easy_mul", "gsm8k"])
    glob = cfg_of(by_source=("easy_*=arith",)).reward
    # Train rows "easy_mul" and eval rows "easy_mul_test" both match the glob; the table shows each source.
    assert check_against_data(glob, ["easy_mul", "easy_mul_test", "aime24"]) == {
        "aime24": "math", "easy_mul": "arith", "easy_mul_test": "arith"}
    exact = cfg_of(by_source=("easy_mul=arith",)).reward
    assert check_against_data(exact, ["easy_mul", "easy_mul_test"]) == {"easy_mul": "arith", "easy_mul_test": "math"}


def test_setup_refuses_math_options_on_the_built_in_task(tmp_path):
    from echorl_jax.trainer.setup import build_setup

    cfg = config_lib.build_config(config_lib.load_config_file(os.path.join(ROOT, "configs", "tiny_test.py")),
                                  {"reward": {"strict": False}, "train": {"workdir": str(tmp_path)}})  # fmt: skip
    with pytest.raises(config_lib.ConfigError, match=r"reward.strict is set but no row of the data"):
        build_setup(cfg)


def test_old_key_and_overrides():
    with pytest.raises(config_lib.ConfigError, match=r"'rl.reward'='math' moved.*reward.name"):
        config_lib.build_config({"rl": {"reward": "math"}})
    cfg = config_lib.build_config(
        {}, config_lib.parse_overrides(["--config.reward.by_source=gsm8k=math,num*=arith", "--config.reward.strict=false"])
    )
    assert cfg.reward.by_source == ("gsm8k=math", "num*=arith") and cfg.reward.strict is False
    assert cfg.reward.routes() == [("gsm8k", "math"), ("num*", "arith")]


# ----------------------------------------------------------------------------- math options from the config


def test_math_options_reach_the_verifier():
    cfg = cfg_of(name="math", strict=False, format_reward=0.5, correct_reward=2.0, timeout_s=20.0, num_workers=1)
    router = default_verifier(cfg)
    try:
        responses = [r"\boxed{2}", r"\boxed{3}", "The answer is 2", RANDOM_OUTPUT]
        res = call_verifier(router, responses, ["2", "2", "2", "3"], rows_of("a", "b", "c", "d"))
        np.testing.assert_allclose(res.reward_n, [2.5, 0.5, 2.0, 2.0])  # loose: the noise "answers" 3
        assert res.correct_n.tolist() == [True, False, True, True]
        math_v = router.get("math")
        assert (math_v.timeout_s, len(math_v._workers), math_v.strict) == (20.0, 1, False)
    finally:
        router.close()


def test_default_config_is_strict():
    router = default_verifier(cfg_of(name="math", timeout_s=20.0, num_workers=1))
    try:
        res = call_verifier(router, [RANDOM_OUTPUT, "The answer is 3", r"\boxed{3}"], ["3"] * 3, rows_of("x", "x", "x"))
        assert res.correct_n.tolist() == [False, True, True]
        assert res.reward_n.tolist() == [0.0, 1.0, 1.0]
    finally:
        router.close()


# ----------------------------------------------------------------------------- custom hook

HOOK = """
import time

CALLS = []

def score(response, ground_truth, *, data_source, extra_info, prompt):
    CALLS.append((response, ground_truth, data_source, extra_info, prompt))
    if response == "BOOM":
        raise KeyError("boom")
    if response == "BAD":
        return "yes"
    if response == "HANG":
        while True:  # a hang in pure Python; a regex's catastrophic backtracking (in C) is killed the same way
            time.sleep(1)
    weight = extra_info.get("weight", 1.0)
    if data_source == "partial":
        return (0.5 * weight, False)
    return weight * float(response.strip() == ground_truth)
"""


@pytest.fixture()
def hook_path(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(textwrap.dedent(HOOK))
    return str(path)


class RowTokenizer:
    """Decodes response row [i] to TEXTS[i]."""

    def __init__(self, texts):
        self.texts = texts

    def batch_decode(self, rows, **_):
        return [self.texts[r[0]] for r in rows]


def fake_rollout(b: int) -> Rollout:
    tok = np.zeros((b, 2), np.int32)
    tok[:, 1] = np.arange(b)  # one response token: the row id
    ones = np.ones((b, 1), bool)
    return Rollout(tok, np.ones((b, 2), bool), ones, np.zeros((b, 1)), np.zeros((b, 1)), np.ones(b, np.int32),
                   np.ones(b, bool))  # fmt: skip


def batch_of(record_index, records, valid=None):
    n = len(record_index)
    return PromptBatch(
        np.zeros((n, 1), np.int32), np.ones(n, np.int32),
        [records[i]["ground_truth"] for i in record_index], [records[i]["data_source"] for i in record_index],
        np.asarray(record_index), np.ones(n, bool) if valid is None else np.asarray(valid),
    )  # fmt: skip


RECORDS = [
    {"prompt": "p0", "ground_truth": "7", "data_source": "gsm8k", "extra_info": {"weight": 2.0, "id": 0}},
    {"prompt": [{"role": "user", "content": "p1"}], "ground_truth": "5", "data_source": "partial"},
    {"prompt": "p2", "ground_truth": "9", "data_source": "gsm8k", "extra_info": None},
]


def test_custom_hook_gets_row_context_and_sets_rewards(hook_path):
    # custom_timeout_s=0: called in this process, so its CALLS are visible here
    router = default_verifier(cfg_of(name="custom", custom=f"{hook_path}:score", custom_timeout_s=0))
    calls = router.get("custom").fn.__globals__["CALLS"]
    texts = ["7", "8", "5", "x", "9", " 9 "]  # records 2, 0, 1 (out of order), G = 2
    batch = batch_of([2, 0, 1], RECORDS)
    batch = batch._replace(ground_truth=["9", "7", "5"])
    reward_ng, correct_ng, info = rollout.verify(router, RowTokenizer(texts), fake_rollout(6), batch, 2, RECORDS)
    np.testing.assert_allclose(reward_ng, [[0.0, 0.0], [0.0, 0.0], [0.5, 0.5]])
    assert calls[0] == ("7", "9", "gsm8k", {}, "p2")  # extra_info None -> {}
    assert calls[2] == ("5", "7", "gsm8k", {"weight": 2.0, "id": 0}, "p0")
    assert calls[4] == ("9", "5", "partial", {}, [{"role": "user", "content": "p1"}])
    assert correct_ng.tolist() == [[False, False], [False, False], [False, False]]
    assert info == {"custom_errors": 0.0, "custom_timeouts": 0.0}

    batch = batch_of([0, 2, 1], RECORDS)
    reward_ng, correct_ng, _ = rollout.verify(router, RowTokenizer(["7", "1", "9", " 9 ", "5", "5"]),
                                              fake_rollout(6), batch, 2, RECORDS)  # fmt: skip
    np.testing.assert_allclose(reward_ng, [[2.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    assert correct_ng.tolist() == [[True, False], [True, True], [False, False]]


@pytest.mark.parametrize("timeout_s", [0.0, 3.0])  # in this process; in killable workers
def test_a_row_that_raises_scores_zero_and_is_counted_a_bad_return_stops(hook_path, timeout_s, caplog):
    router = default_verifier(cfg_of(name="custom", custom=f"{hook_path}:score", custom_timeout_s=timeout_s))
    spec = f"{hook_path}:score"
    try:
        res = call_verifier(router, ["1", "BOOM", "1"], ["1", "1", "2"],
                            [RewardRow("a", {}, "p", 3), RewardRow("b", {}, "p", 4), RewardRow("a", {}, "p", 5)])
        assert res.reward_n.tolist() == [1.0, 0.0, 0.0] and res.correct_n.tolist() == [True, False, False]
        assert res.info == {"custom_errors": 1.0, "custom_timeouts": 0.0}
        assert f"{spec}': 1 of 3 rows scored 0" in caplog.text
        assert "raised KeyError: 'boom' on row 1 (record 4, data_source 'b')" in caplog.text
        with pytest.raises(RewardFnError, match=r"returned 'yes'; expected a finite float or \(float, bool\) on row 0"):
            call_verifier(router, ["BAD"], ["1"], rows_of("a"))
    finally:
        router.close()


def test_a_row_that_hangs_is_killed_at_the_time_limit_and_the_others_are_scored(hook_path, caplog):
    import time

    router = default_verifier(cfg_of(name="custom", custom=f"{hook_path}:score", custom_timeout_s=2.0,
                                     custom_workers=2))  # fmt: skip
    try:
        call_verifier(router, ["1"], ["1"], rows_of("a"))  # workers started (the first call's import cost)
        t0 = time.monotonic()
        res = call_verifier(router, ["1", "HANG", "2", "2"], ["1", "1", "2", "3"], rows_of("a", "a", "a", "a"))
        took = time.monotonic() - t0
        assert res.reward_n.tolist() == [1.0, 0.0, 1.0, 0.0] and res.info["custom_timeouts"] == 1.0
        assert 2.0 <= took < 15.0, took  # bounded by the limit (+ restarting the killed worker), not by the hang
        assert "ran over reward.custom_timeout_s=2 on row 1" in caplog.text
        again = call_verifier(router, ["2"], ["2"], rows_of("a"))  # the pool goes on with a fresh worker
        assert again.reward_n.tolist() == [1.0]
    finally:
        router.close()


def test_bad_custom_hook_fails_at_start_up(hook_path):
    with pytest.raises(config_lib.ConfigError, match=r"has no function 'nope' \(callables there: \['score'\]\)"):
        default_verifier(cfg_of(name="custom", custom=f"{hook_path}:nope"))
    with pytest.raises(config_lib.ConfigError, match=r"importing 'no_such_pkg_xyz' failed: ModuleNotFoundError"):
        default_verifier(cfg_of(name="custom", custom="no_such_pkg_xyz:fn"))
    ok = default_verifier(cfg_of(name="custom", custom="os.path:isabs"))  # package.module:fn form
    assert ok.get("custom").fn.__name__ == "isabs"


# ----------------------------------------------------------------------------- routing by data_source


class Fake:
    """Reward = a constant; records every call so a test can see which rows each verifier got."""

    def __init__(self, value):
        self.value, self.calls = value, []

    def __call__(self, responses, ground_truths):
        self.calls.append(list(responses))
        n = len(responses)
        return RewardResult(np.full(n, self.value, np.float32), np.full(n, self.value > 0), {"no_answer": 1.0, "n": n})


def test_by_source_routes_rows_and_combines_info(monkeypatch, hook_path):
    fakes = {"fake_a": Fake(0.25), "fake_b": Fake(0.75)}
    for name, fake in fakes.items():
        monkeypatch.setitem(VERIFIERS, name, lambda fake=fake: fake)
    cfg = cfg_of(by_source=("gsm8k=fake_a", "num*=fake_b", "mine=custom", "arith_*=fake_b"), custom=f"{hook_path}:score")
    router = build_router(cfg.reward)
    sources = ["arith", "gsm8k", "numina_1", "other", "gsm8k", "numina_2", "mine", "arith_hard"]
    responses = ["answer 18", "r1", "r2", "r3", "r4", "r5", "4", "r7"]
    truths = ["18", "x", "x", "x", "x", "x", "4", "x"]
    assert [router.verifier_for(s) for s in sources] == ["arith", "fake_a", "fake_b", "math", "fake_a", "fake_b",
                                                         "custom", "fake_b"]  # fmt: skip
    sources[3] = "arith"  # keep the math workers out of this test; auto's math branch is checked above
    responses[3], truths[3] = "answer 3", "4"
    res = call_verifier(router, responses, truths, rows_of(*sources))
    np.testing.assert_allclose(res.reward_n, [1.0, 0.25, 0.75, 0.0, 0.25, 0.75, 1.0, 0.75])
    assert res.correct_n.tolist() == [True, True, True, False, True, True, True, True]
    assert fakes["fake_a"].calls == [["r1", "r4"]] and fakes["fake_b"].calls == [["r2", "r5", "r7"]]  # one call each
    # arith + fakes + custom's counters, summed
    assert res.info == {"no_answer": 2.0, "correct": 1.0, "n": 5.0, "custom_errors": 0.0, "custom_timeouts": 0.0}
    router.close()


def test_auto_sends_the_builtin_task_to_arith():
    router = default_verifier(config_lib.build_config({}))
    assert router.verifier_for("arith") == "arith" and router.verifier_for("openai/gsm8k") == "math"
    res = call_verifier(router, ["1+2=3\nanswer 3", "answer 4"], ["3", "3"], rows_of("arith", "arith"))
    assert res.correct_n.tolist() == [True, False]
    assert "math" not in router._built  # no math workers for a run that never sees a math row


def test_evaluate_skips_padding_rows(hook_path):
    router = default_verifier(cfg_of(name="custom", custom=f"{hook_path}:score", custom_timeout_s=0))
    calls = router.get("custom").fn.__globals__["CALLS"]
    pipeline = [batch_of([0, 1], RECORDS, valid=[True, False])]  # row 1 pads the last eval batch
    texts = ["7", "1", "BOOM", "BOOM"]  # a padding row never reaches the hook

    def sample_fn(params, tokens, lengths, rng, row_ids):
        assert row_ids.tolist() == [0, 1, 2, 3]  # sample j of record i: stream i·k + j
        return fake_rollout(4)

    out = grading.evaluate(sample_fn, None, pipeline, RECORDS, router, RowTokenizer(texts), k=2, rng=jax.random.key(0))
    assert len(calls) == 2
    assert out["avg@2"] == 0.5 and out["pass@2"] == 1.0 and out["count"] == 1.0
