"""LUFFY's think setting: the assistant turn opens with data.response_prefix ("<think>\\n"), expert traces lose
it, and reward.think grades only what follows "</think>" (LUFFY's math_verify_reward.py)."""

from __future__ import annotations

import numpy as np
import pytest
from byo_fixture import CHATML, make_bpe_tokenizer

from echorl_jax import config as config_lib
from echorl_jax.data.pipeline import render_prompt
from echorl_jax.rewards.math import MathVerifier, after_think
from echorl_jax.rl import offpolicy

THINK = "<think>\n"
MSGS = [{"role": "system", "content": "Think."}, {"role": "user", "content": "1+1?"}]


def test_response_prefix_is_appended_once():
    tok = make_bpe_tokenizer()
    plain = render_prompt(MSGS, tok, "chat")
    assert plain.endswith("<|im_start|>assistant\n")
    assert render_prompt(MSGS, tok, "chat", THINK) == plain + THINK
    # A think model's own template writes the prefix: it is not doubled.
    tok.chat_template = CHATML.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")
    assert render_prompt(MSGS, tok, "chat", THINK) == plain + THINK
    assert render_prompt("Q: 1+1?", tok, "{prompt}\n", THINK) == "Q: 1+1?\n" + THINK


def test_expert_traces_lose_a_leading_prefix():
    tok = make_bpe_tokenizer()
    records = [{"expert": THINK + "1+1=2\n</think>\n\\boxed{2}"}, {"expert": "no think 2"}]
    kw = dict(key="expert", k=1, max_new_tokens=64, stop_id=0, pad_id=0)
    stripped = offpolicy.ExpertTraces(records, tok, response_prefix=THINK, **kw)
    assert stripped.texts == [["1+1=2\n</think>\n\\boxed{2}"], ["no think 2"]]
    assert offpolicy.ExpertTraces(records, tok, **kw).texts[0] == [records[0]["expert"]]
    tokens, lengths = stripped.rows(np.array([0]))
    ids = tok("1+1=2\n</think>\n\\boxed{2}", add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(tokens[0, 0, : len(ids)], ids)


def test_after_think_takes_the_text_after_the_first_close():
    assert after_think("a</think>\n\\boxed{2}") == "\n\\boxed{2}"
    assert after_think("a</think>b</think>c") == "b"  # LUFFY: split("</think>")[1]
    assert after_think("\\boxed{2}") is None


def test_think_reward_requires_the_close_before_the_answer():
    responses = ["2+2 is 4.\n</think>\nThe answer is \\boxed{4}.", "\\boxed{4}", "\\boxed{4} then </think> nothing",
                 "</think> 4"]  # fmt: skip
    with MathVerifier(num_workers=1, timeout_s=20.0, think=True, strict=False) as v:
        out = v(responses, ["4"] * 4)
    np.testing.assert_array_equal(out.correct_n, [True, False, False, True])
    assert out.info["no_think"] == 1 and out.info["no_answer"] >= 1
    with MathVerifier(num_workers=1, timeout_s=20.0) as v:  # without think: the box anywhere counts
        assert v(responses[:2], ["4"] * 2).correct_n.tolist() == [True, True]


def test_think_settings_are_validated():
    with pytest.raises(config_lib.ConfigError, match="reward.think"):
        config_lib.build_config({"reward": {"name": "arith", "think": True}})
    with pytest.raises(config_lib.ConfigError, match="data.response_prefix"):
        config_lib.build_config({"data": {"response_prefix": THINK}, "sft": {"steps": 5}})
    cfg = config_lib.build_config({"data": {"response_prefix": THINK}, "reward": {"think": True}})
    assert cfg.data.response_prefix == THINK and cfg.reward.think
