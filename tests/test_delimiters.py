"""echo.delimiter_ids: the auto rule (every token whose text holds a newline) against a given list (the paper's
code: Qwen2.5's "\\n" and "\\n\\n"), on a byte-level BPE tokenizer built offline with Qwen2's pre-tokenizer, so
that merged tokens such as ".\\n\\n" and ")\\n" exist as they do in Qwen2.5's vocabulary."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from echorl_jax import config as config_lib
from echorl_jax.models.tokenizer import describe_stops
from echorl_jax.rl import echo as E

# Qwen2's pre-tokenizer: punctuation keeps the newlines that follow it (".\n\n" is one pre-token).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
MERGES = [("Ċ", "Ċ"), (".", "ĊĊ"), (")", "Ċ")]  # "\n\n", ".\n\n", ")\n" (Ċ is byte-level "\n")
TEXT = "Let x = 1.\n\nThen y = (2)\nso\n\nz\n"


@pytest.fixture(scope="module")
def tok():
    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")


def one(tok, text: str) -> int:
    (i,) = tok.encode(text, add_special_tokens=False)
    return i


def steps(tok, ids: list[int]) -> list[str]:
    """The response's steps as texts, split where ``echo.step_ends`` says."""
    tokens = tok.encode(TEXT, add_special_tokens=False)
    end = np.asarray(E.step_ends(jnp.asarray([tokens]), jnp.ones((1, len(tokens)), bool), jnp.asarray(ids)))[0]
    cuts = [0, *(np.flatnonzero(end) + 1)]
    return [tok.decode(tokens[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]


def test_the_two_rules_split_differently(tok):
    newline, blank, dot_blank, paren_nl = (one(tok, t) for t in ("\n", "\n\n", ".\n\n", ")\n"))
    auto, auto_rule = E.resolve_delimiters(tok, "auto")
    assert auto == sorted([newline, blank, dot_blank, paren_nl]) and "auto" in auto_rule
    assert steps(tok, auto) == ["Let x = 1.\n\n", "Then y = (2)\n", "so\n\n", "z\n"]
    for spec in ((newline, blank), ("\n", "\n\n"), ("\n\n", newline), "[%d, %d]" % (newline, blank)):
        got, rule = E.resolve_delimiters(tok, spec)
        assert got == [newline, blank] and rule.startswith("echo.delimiter_ids=["), spec
    # ".\n\n" and ")\n" end no step: only a token that is "\n" or "\n\n" does (the last step ends the response).
    assert steps(tok, [newline, blank]) == ["Let x = 1.\n\nThen y = (2)\nso\n\n", "z\n"]


def test_the_rules_choose_different_echo_clips(tok):
    tokens = tok.encode(TEXT, add_special_tokens=False)
    texts = [tok.decode([t]) for t in tokens]
    start = "".join(texts).index("Then")
    pos = np.cumsum([0, *map(len, texts)])[:-1]
    entropy = ((pos >= start) & (pos < start + len("Then y = (2)\n"))).astype(np.float32)  # a hard step
    args = (jnp.asarray([tokens]), jnp.ones((1, len(tokens)), bool), jnp.asarray([entropy]), jnp.ones((1, 1)))
    clip_text = {}
    for spec in ("auto", ("\n", "\n\n")):
        ids = jnp.asarray(E.resolve_delimiters(tok, spec)[0])
        mask = np.asarray(E.echo_clips(*args, ids, E.EchoConfig()).mask_bt)[0]
        clip_text[spec if spec == "auto" else "given"] = tok.decode([t for t, m in zip(tokens, mask) if m])
    assert clip_text == {"auto": "Let x = 1.\n\nThen y = (2)\n", "given": "Let x = 1.\n\nThen y = (2)\nso\n\n"}


def test_bad_delimiters_name_the_key_and_value(tok):
    with pytest.raises(ValueError, match=r"echo.delimiter_ids=\['\\n', 'ab'\]: the text 'ab' is not one token"):
        E.resolve_delimiters(tok, ("\n", "ab"))
    with pytest.raises(ValueError, match=rf"echo.delimiter_ids=\[{len(tok)}\]: id {len(tok)} is outside"):
        E.resolve_delimiters(tok, (len(tok),))
    for bad in ("[-1]", "[True]", "[]", "newline please", "['']", "[1.5]"):
        with pytest.raises(config_lib.ConfigError, match="echo.delimiter_ids="):
            config_lib.build_config({}, config_lib.parse_overrides([f"--config.echo.delimiter_ids={bad}"]))


def test_config_values_and_command_line_agree():
    build = lambda v: config_lib.build_config({}, {"echo": {"delimiter_ids": v}}).echo.delimiter_ids  # noqa: E731
    assert build("auto") == "auto" and config_lib.build_config().echo.delimiter_ids == "auto"
    assert build("[198,271]") == build("198,271") == build([198, 271]) == build((198, 271)) == (198, 271)
    assert build("['\\n', 198]") == build(["\n", 198]) == ("\n", 198)
    cfg = config_lib.build_config({}, config_lib.parse_overrides(["--config.echo.delimiter_ids=[198,271]"]))
    assert config_lib.to_dict(cfg)["echo"]["delimiter_ids"] == (198, 271)


def test_start_up_log_shows_the_rule_and_the_ids(tok):
    newline, blank = one(tok, "\n"), one(tok, "\n\n")
    for spec, want in (("auto", f"4 tokens ({E.AUTO_RULE}): "), (("\n", "\n\n"), "2 tokens (echo.delimiter_ids=")):
        line = describe_stops(tok, [0], *E.resolve_delimiters(tok, spec))[1]
        assert line.startswith(f"step delimiters: {want}"), line
        assert f"{newline} '\\n'" in line and f"{blank} '\\n\\n'" in line, line


def test_start_up_uses_and_logs_the_given_delimiters(tmp_path):
    from byo_fixture import make_byo_dir

    from echorl_jax.trainer import setup as setup_lib

    byo = make_byo_dir(tmp_path / "byo")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"prompt": "What is {i} + 1?", "answer": "{i + 1}"}}\n' for i in range(8)))
    values = {"model": {"path": byo}, "data": {"train": str(data), "eval": ""}, "rl": {"prompts_per_step": 2},
              "train": {"workdir": str(tmp_path / "run")}}  # fmt: skip
    cfg = config_lib.build_config(values, {"echo": {"delimiter_ids": "['\\n']"}})
    lines = []
    s = setup_lib.build_setup(cfg, log=lines.append)
    newline = s.tokenizer.convert_tokens_to_ids("Ċ")
    assert s.delimiter_ids.tolist() == [newline]
    assert f"step delimiters: 1 tokens (echo.delimiter_ids=['\\n']): {newline} '\\n'" in lines
    with pytest.raises(config_lib.ConfigError, match=r"echo.delimiter_ids=\['\\n\\nx'\]: the text"):
        setup_lib.build_setup(config_lib.build_config(values, {"echo": {"delimiter_ids": ["\n\nx"]}}), log=print)
