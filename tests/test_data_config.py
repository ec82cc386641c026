"""data.* config: defaults that resolve per dataset kind, mixtures, start-up checks and logs."""

from __future__ import annotations

import json
import os

import pytest

from echorl_jax import config as config_lib
from echorl_jax.data.pipeline import DataError
from echorl_jax.tasks import arith
from echorl_jax.trainer import setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_test.py")


def cfg_with(tmp_path, **data) -> config_lib.Config:
    values = config_lib.load_config_file(TINY)
    return config_lib.build_config(values, {"train": {"workdir": str(tmp_path / "run")},
                                            "sft": {"steps": 0}, "data": data})


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_defaults_resolve_per_kind(tmp_path):
    data = config_lib.DataConfig()
    assert (data.template, data.eval) == ("auto", "auto")
    task = cfg_with(tmp_path)
    assert setup.eval_source(task) == "task:arith"
    assert setup.load_eval_records(task) == arith.make_eval_records(task.task, 4, task.data.seed + 1)
    # A file dataset never evaluates on the built-in task by default.
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "answer": "1"}])
    files = cfg_with(tmp_path, train=train)
    assert setup.eval_source(files) == "" and setup.load_eval_records(files) == []
    with pytest.raises(config_lib.ConfigError, match=r"data\.eval='task:arith'.*file dataset.*data\.eval"):
        cfg_with(tmp_path, train=train, eval="task:arith")
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"prompt": "q", "answer": "2"}])
    assert setup.load_eval_records(cfg_with(tmp_path, train=train, eval=dev))[0]["prompt"] == "q"


def test_mixtures_in_config_and_on_the_command_line(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"problem": "a0", "sol": "1"}, {"problem": "a1", "sol": "2"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"problem": "b0", "sol": "3", "data_source": "bee"}])
    keys = dict(prompt_key="problem", answer_key="sol")
    cfg = cfg_with(tmp_path, train=[a, b], eval=(b,), **keys)
    assert cfg.data.train == (a, b) and cfg.data.eval == b  # one file stays a string
    recs = setup.load_train_records(cfg)
    assert [(r["prompt"], r["ground_truth"], r["data_source"]) for r in recs] == [
        ("a0", "1", "a"), ("a1", "2", "a"), ("b0", "3", "bee")]
    cli = config_lib.build_config(config_lib.load_config_file(TINY),
                                  config_lib.parse_overrides([f"--config.data.train={a},{b}"]))
    assert cli.data.train == (a, b)
    with pytest.raises(config_lib.ConfigError, match="built-in tasks cannot be mixed"):
        cfg_with(tmp_path, train=(a, "task:arith"))
    c = write_jsonl(tmp_path / "c.jsonl", [{"problem": "c0", "sol": "4"}, {"problem": "c1"}])
    with pytest.raises(DataError, match=r"c\.jsonl, line 2 \(row 1\): missing 'sol'"):
        setup.load_train_records(cfg_with(tmp_path, train=(a, c), **keys))


def test_template_checked_at_start_up(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"data\.template.*'\{question\}'"):
        cfg_with(tmp_path, template="{question}")


def test_sft_on_a_file_needs_a_solution_column(tmp_path):
    rows = [{"prompt": "1+1", "answer": "2", "solution": "1+1=2"}, {"prompt": "2+2", "answer": "4"}]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = config_lib.build_config(config_lib.load_config_file(TINY), {"data": {"train": train}, "sft": {"steps": 5}})
    with pytest.raises(DataError, match=r"t\.jsonl, row 1: sft\.steps=5 .* 'solution'"):
        setup.load_train_records(cfg)
    rows[1]["solution"] = "2+2=4"
    write_jsonl(tmp_path / "t.jsonl", rows)
    assert [r["solution"] for r in setup.load_train_records(cfg)] == ["1+1=2", "2+2=4"]


def test_start_up_logs_drops_of_both_splits(tmp_path):
    logs = []
    setup.build_setup(cfg_with(tmp_path, max_prompt_len=6), log=logs.append)
    drops = {line.split()[4]: line for line in logs if line.startswith("dropped")}
    assert set(drops) == {"train", "eval"}, logs
    # The tiny config's eval set: 4 prompts per level, levels 1..2 (5 and 8 chars).
    assert drops["eval"].startswith("dropped 4 of 8 eval prompts longer than data.max_prompt_len=6")
    assert "8 tokens" in drops["eval"]


def test_file_run_without_eval_says_so(tmp_path):
    from tests.test_data import make_tokenizer

    tok_dir = str(tmp_path / "tok")
    make_tokenizer().save_pretrained(tok_dir)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "1+1?"}]
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": json.dumps(msgs), "answer": "2"}] * 8)
    logs = []
    s = setup.build_setup(cfg_with(tmp_path, train=train, tokenizer=tok_dir, max_prompt_len=40), log=logs.append)
    assert s.eval_pipeline is None and "no held-out evaluation: set data.eval" in " ".join(logs)
    # template auto: the JSON-encoded conversation went through the chat template.
    batch = next(s.train_pipeline)
    n = int(batch.length_n[0])
    want = s.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert batch.tokens_np[0, -n:].tolist() == s.tokenizer(want, add_special_tokens=False)["input_ids"]


def test_data_problems_surface_before_any_weights_load(tmp_path, monkeypatch):
    """Prompt lengths, templates and rewards are checked before the (possibly 7B) model is built."""

    def no_model(*_, **__):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(setup, "build_model", no_model)
    from byo_fixture import make_bpe_tokenizer

    make_bpe_tokenizer().save_pretrained(tmp_path / "tok")
    long_prompts = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x " * 50, "answer": "1"}] * 4)
    cfg = config_lib.build_config(config_lib.load_config_file(TINY), {
        "train": {"workdir": str(tmp_path / "run")}, "sft": {"steps": 0},
        "data": {"train": long_prompts, "tokenizer": str(tmp_path / "tok")}})  # fmt: skip
    with pytest.raises(DataError, match="longest"):
        setup.build_setup(cfg, log=lambda _: None)
