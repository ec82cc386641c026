"""A user's own data and model: the cases that went wrong quietly or with a misleading message (issue 23).
Each gets the right behaviour or a clear start-up message naming the setting."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from byo_fixture import IM_END, make_bpe_tokenizer, make_byo_dir

from echorl_jax import cli, compare, config as config_lib, main as main_lib
from echorl_jax.data.formats import DataError, load_records
from echorl_jax.models.config import ModelConfig, ModelConfigError, from_hf_config, to_hf_config
from echorl_jax.models.tokenizer import pad_token_id
from echorl_jax.trainer import setup as setup_lib


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    return make_byo_dir(tmp_path_factory.mktemp("byo"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows(n=8, source="easy_mul", answer_key="answer"):
    return [{"prompt": f"What is {i} + 1?", answer_key: str(i + 1), "data_source": source} for i in range(n)]


def build(byo, tmp_path, data, **sections):
    values = {"model": {"path": byo}, "data": {"max_prompt_len": 40, **data},
              "sampling": {"max_new_tokens": 8}, "rl": {"prompts_per_step": 8, "group_size": 2},
              "train": {"workdir": str(tmp_path / "run"), "steps": 1, "progress": False}}
    for k, v in sections.items():
        values[k] = {**values.get(k, {}), **v}
    cfg = config_lib.build_config(values)
    lines = []
    return setup_lib.build_setup(cfg, log=lines.append), lines


# ------------------------------------------------------------------- 1. chat model, plain-string prompts


def test_auto_template_uses_a_chat_models_template_for_string_prompts_and_says_so(byo, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows())
    s, lines = build(byo, tmp_path, {"train": train, "eval": ""})
    im_end = s.tokenizer.convert_tokens_to_ids(IM_END)
    assert im_end in s.stop_ids  # the chat template's end of turn stops responses
    batch = next(s.train_pipeline)
    text = s.tokenizer.decode(batch.tokens_np[0][-batch.length_n[0]:])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert any(line.startswith("prompts: the tokenizer's chat template (data.template='auto'") for line in lines)
    assert any(line.startswith("stop ids:") and IM_END in line for line in lines)
    # an explicit format string keeps the text as given (and the end-of-turn token is no stop)
    s2, lines2 = build(byo, tmp_path, {"train": train, "eval": "", "template": "{prompt}"})
    assert im_end not in s2.stop_ids and "prompts: data.template='{prompt}'" in lines2


# ------------------------------------------------------------------- 2. by_source patterns and the routing log


def test_by_source_typo_is_refused_and_every_source_is_logged_with_its_verifier(byo, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows())
    ev = write_jsonl(tmp_path / "eval.jsonl", rows(4, source="easy_mul_test"))
    with pytest.raises(config_lib.ConfigError, match=r"by_source entry 'easy_mul_v2=arith' matches no data_source"):
        build(byo, tmp_path, {"train": train, "eval": ev}, reward={"by_source": ("easy_mul_v2=arith",)})
    _, lines = build(byo, tmp_path, {"train": train, "eval": ev}, reward={"by_source": ("easy_mul=arith",)})
    assert "rewards (train): easy_mul -> arith" in lines
    assert "rewards (eval): easy_mul_test -> math" in lines  # visible: the exact pattern misses the eval rows


# ------------------------------------------------------------------- 3. llama3 rope scaling missing a field


def test_llama3_rope_scaling_missing_a_field_names_it():
    hf = {k: v for k, v in to_hf_config(ModelConfig(head_dim=16)).items() if k != "rope_parameters"}
    scaling = {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    with pytest.raises(ModelConfigError, match=r"x.json: rope_scaling of type 'llama3' lacks low_freq_factor"):
        from_hf_config({**hf, "rope_scaling": scaling}, where="x.json")  # transformers 4 layout
    with pytest.raises(ModelConfigError, match=r"rope_parameters of type 'llama3' lacks factor, low_freq_factor"):
        from_hf_config({**hf, "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}}, where="x.json")
    full = from_hf_config({**hf, "rope_scaling": {**scaling, "low_freq_factor": 1.0}}, where="x.json")
    assert (full.rope_type, full.rope_low_freq_factor) == ("llama3", 1.0)


# ------------------------------------------------------------------- 4. a tokenizer with no eos and no pad


def test_pad_id_without_pad_or_eos_token():
    tok = make_bpe_tokenizer()
    assert pad_token_id(tok) == (tok.pad_token_id, "")
    tok.pad_token, tok.eos_token = None, None
    pad, why = pad_token_id(tok, stops=((5, 6), 9))
    assert pad == 9 and "first stop id 9" in why and "no pad or eos" in why
    assert pad_token_id(tok, stops=((5, 6),))[0] == 0


def test_setup_with_a_tokenizer_without_eos_or_pad_uses_the_stop_string(byo, tmp_path):
    tok_dir = tmp_path / "tok"
    tok = make_bpe_tokenizer(chat_template=None)
    tok.pad_token, tok.eos_token = None, None
    tok.save_pretrained(str(tok_dir))
    train = write_jsonl(tmp_path / "train.jsonl", rows())
    data = {"train": train, "eval": "", "tokenizer": str(tok_dir)}
    with pytest.raises(config_lib.ConfigError, match=r"no eos_token and rl.stop_strings is empty"):
        build(byo, tmp_path, data)
    s, lines = build(byo, tmp_path, data, rl={"stop_strings": ("\n",)})
    newline = s.tokenizer.encode("\n", add_special_tokens=False)[0]
    assert s.stop_ids == (newline,) and any(f"pad id: the first stop id {newline}" in line for line in lines)
    batch = next(s.train_pipeline)
    p = batch.tokens_np.shape[1]
    pads = [row[: p - n] for row, n in zip(batch.tokens_np, batch.length_n)]
    assert sum(len(x) for x in pads) > 0 and all((x == newline).all() for x in pads)  # left padding is the stop id


# ------------------------------------------------------------------- 5. the eval files' own columns


def test_eval_files_have_their_own_column_keys(byo, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(answer_key="solution"))  # TRL-style
    ev = tmp_path / "eval.parquet"  # verl-style
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1?", "reward_model": {"ground_truth": "2"},
                                          "data_source": "easy_mul_test"}] * 4), ev)
    with pytest.raises(DataError, match=r"eval.parquet, row 0: missing column\(s\) 'solution'.*data.eval_answer_key"):
        build(byo, tmp_path, {"train": train, "eval": str(ev), "answer_key": "solution"})
    s, _ = build(byo, tmp_path, {"train": train, "eval": str(ev), "answer_key": "solution",
                                 "eval_answer_key": "reward_model.ground_truth"})
    assert [r["ground_truth"] for r in s.eval_records] == ["2"] * 4
    assert s.train_records[0]["ground_truth"] == "1"


# ------------------------------------------------------------------- 6. smaller ones


def test_null_ground_truth_and_a_directory_as_data_file(tmp_path):
    bad = tmp_path / "null.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "reward_model": {"ground_truth": None},
                                          "data_source": "s"}]), bad)
    with pytest.raises(DataError, match=r"null.parquet, row 0: 'reward_model.ground_truth' is null"):
        load_records(bad)
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows(1))
    with pytest.raises(DataError, match=r"data: is a directory; give data files .*data/a.jsonl"):
        load_records(folder)


def test_custom_reward_returning_a_bad_value_is_a_one_line_error(byo, tmp_path, capsys):
    hook = tmp_path / "hook.py"
    hook.write_text("def score(response, ground_truth, **kw):\n    return 'yes'\n")
    train = write_jsonl(tmp_path / "train.jsonl", rows())
    config = tmp_path / "cfg.py"
    config.write_text("def get_config():\n    return " + repr({
        "model": {"path": byo}, "data": {"train": train, "eval": "", "max_prompt_len": 40},
        "sampling": {"max_new_tokens": 4}, "rl": {"prompts_per_step": 8, "group_size": 2},
        "reward": {"name": "custom", "custom": f"{hook}:score"},
        "train": {"workdir": str(tmp_path / "run"), "steps": 1, "progress": False, "export_hf": False}}) + "\n")
    assert main_lib.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: RewardFnError: custom reward") and "returned 'yes'" in err
    assert cli.user_errors()  # the tools share the list


def test_compare_report_title_names_the_methods_compared(tmp_path):
    cfg = config_lib.build_config({"train": {"workdir": str(tmp_path), "steps": 2}})
    run = {"eval": {"avg@4": 0.5}, "step_time": 1.0, "regime": None}
    results = {name: {0: run} for name in ("grpo", "grpo+echo")}
    summary = compare.write(cfg, results, (0,), ("grpo",))
    text = (tmp_path / "compare.md").read_text()
    assert text.splitlines()[0] == "# GRPO vs +EchoRL" and list(summary) == ["grpo"]
