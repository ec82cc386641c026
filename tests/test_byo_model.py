"""Bringing your own Hugging Face model: tokenizer loaded exactly, default stops, export, config errors."""

import json
import os

import pytest
from byo_fixture import CHATML, EOS, IM_END, VOCAB_SIZE, make_bpe_tokenizer, make_byo_dir
from tokenizers import Tokenizer

from echorl_jax import config as config_lib, main as main_lib
from echorl_jax.models.config import ModelConfig, ModelConfigError, from_hf_config, to_hf_config
from echorl_jax.models.hf import export_model, load_model
from echorl_jax.models.tokenizer import end_of_turn_token
from echorl_jax.trainer import setup as setup_lib

TEXTS = (" 123", "What is 12 + 34?\n\nThe answer is 46.", "<|im_start|>user\n 1234<|im_end|>\n")


def cfg_for(path, **sections):
    values = {"model": {"path": str(path)}, "data": {"train": "unused.jsonl", "eval": ""}}
    for name, fields in sections.items():
        values[name] = {**values.get(name, {}), **fields}
    return config_lib.build_config(values)


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    return make_byo_dir(tmp_path_factory.mktemp("byo"), generation_eos=[0, 7])


def file_encodings(path):
    raw = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    return [raw.encode(t).ids for t in TEXTS]


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_the_directorys_own(byo):
    tok = setup_lib.load_tokenizer(cfg_for(byo))
    assert [tok.encode(t) for t in TEXTS] == file_encodings(byo)
    assert tok.convert_ids_to_tokens(tok.encode(" 123")) == ["Ġ123"]  # Qwen2Tokenizer would give Ġ,1,2,3
    assert (tok.eos_token, tok.pad_token, tok.chat_template) == (EOS, EOS, CHATML)
    assert IM_END in tok.all_special_tokens


def test_export_keeps_the_tokenizer(byo, tmp_path):
    tok = setup_lib.load_tokenizer(cfg_for(byo))
    export_model(load_model(byo), str(tmp_path), tokenizer=tok)
    assert file_encodings(tmp_path) == file_encodings(byo)
    again = setup_lib.load_tokenizer(cfg_for(tmp_path))
    assert [again.encode(t) for t in TEXTS] == file_encodings(byo) and again.chat_template == CHATML


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    path = make_byo_dir(tmp_path / "weights_only", tokenizer=False)
    with pytest.raises(FileNotFoundError, match=r"model.path='.*weights_only' holds no tokenizer.*data.tokenizer"):
        setup_lib.load_tokenizer(cfg_for(path))
    # data.tokenizer pointing at the tokenizer's directory fixes it
    tok_dir = str(tmp_path / "tok")
    make_bpe_tokenizer().save_pretrained(tok_dir)
    assert len(setup_lib.load_tokenizer(cfg_for(path, data={"tokenizer": tok_dir}))) == len(make_bpe_tokenizer())


# --------------------------------------------------------------------------- stops


@pytest.mark.parametrize("generation_eos, want_gen", [(None, ()), (7, (7,)), ([2, 9, 0], (2, 9))])
def test_default_stop_ids(tmp_path, generation_eos, want_gen):
    path = make_byo_dir(tmp_path, generation_eos=generation_eos)
    tok = setup_lib.load_tokenizer(cfg_for(path))
    im_end = tok.convert_tokens_to_ids(IM_END)
    chat = setup_lib.stop_ids(cfg_for(path, data={"template": "chat"}), tok)
    assert chat == tuple(dict.fromkeys((0, *want_gen, im_end)))
    plain = setup_lib.stop_ids(cfg_for(path, data={"template": "{prompt}"}), tok)
    assert plain == tuple(dict.fromkeys((0, *want_gen)))


def test_multi_token_stop_strings(byo):
    tok = setup_lib.load_tokenizer(cfg_for(byo))
    stops = setup_lib.stop_ids(cfg_for(byo, rl={"stop_strings": ("The answer", "\n")}), tok)
    multi = tok.encode("The answer", add_special_tokens=False)
    im_end = tok.convert_tokens_to_ids(IM_END)  # template auto + a chat tokenizer: its end of turn stops too
    assert len(multi) > 1 and stops == (0, 7, im_end, tuple(multi), *tok.encode("\n", add_special_tokens=False))


@pytest.mark.parametrize("template, want", [
    (CHATML, IM_END),
    ("{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}", EOS),  # Mistral-like: turn ends with eos
    ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", None),  # nothing special closes a turn
    ("{% for m in messages %}{% if m.role == 'assistant' %}{{ raise_exception('no') }}{% endif %}"
     "<|im_start|>{{ m.content }} <|im_end|>{% endfor %}", IM_END),  # user-only fallback; whitespace skipped
])  # fmt: skip
def test_end_of_turn_token(template, want):
    assert end_of_turn_token(make_bpe_tokenizer(template)) == want


def test_build_setup_logs_and_export_carries_stops(byo, tmp_path):
    transformers = pytest.importorskip("transformers")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    cfg = config_lib.build_config({
        "model": {"path": byo}, "data": {"train": str(data), "eval": "", "template": "chat"},
        "rl": {"prompts_per_step": 2, "group_size": 4}, "train": {"workdir": str(tmp_path / "run")},
    })  # fmt: skip
    lines = []
    s = setup_lib.build_setup(cfg, log=lines.append)
    im_end = s.tokenizer.convert_tokens_to_ids(IM_END)
    assert s.stop_ids == (0, 7, im_end)
    stop_line = next(line for line in lines if line.startswith("stop ids:"))
    assert f"{im_end} '{IM_END}'" in stop_line and f"0 '{EOS}'" in stop_line
    assert any(line.startswith(f"step delimiters: {len(s.delimiter_ids)} tokens (echo.delimiter_ids=auto: ")
               for line in lines)  # fmt: skip

    out = str(tmp_path / "export")
    s.export(out)
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [0, 7, im_end] and gen.pad_token_id == 0
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    assert (hf_cfg.eos_token_id, hf_cfg.pad_token_id) == (0, 0)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == [0, 7, im_end]
    assert file_encodings(out) == file_encodings(byo)


# --------------------------------------------------------------------------- config


def test_hidden_act_other_than_silu_is_rejected():
    cfg = ModelConfig(head_dim=16)
    hf = to_hf_config(cfg)
    assert from_hf_config(hf) == from_hf_config({**hf, "hidden_act": "swish"}) == cfg
    with pytest.raises(ModelConfigError, match="x.json: hidden_act='gelu' is not supported"):
        from_hf_config({**hf, "hidden_act": "gelu"}, where="x.json")


def test_architecture_override_error_names_key_and_value(byo):
    with pytest.raises(config_lib.ConfigError, match=r"model.hidden_size='64' is invalid: the architecture comes from"):
        config_lib.build_config({"model": {"path": byo}}, {"model": {"hidden_size": "64"}})


def test_print_config_shows_the_checkpoints_architecture(byo, capsys, tmp_path):
    config_file = tmp_path / "byo.py"
    config_file.write_text(f"def get_config():\n    return {{'model': {{'path': {byo!r}}}, 'data': {{'eval': ''}}}}\n")
    argv = ["--config", str(config_file), "--print-config", "--config.model.param_dtype=bfloat16"]
    assert main_lib.main(argv) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert (model["model_type"], model["vocab_size"], model["hidden_size"]) == ("qwen2", VOCAB_SIZE, 32)
    assert model["param_dtype"] == "bfloat16" and model["path"] == byo
    assert main_lib.main(["--config", str(config_file), "--print-config", "--config.model.path=/nonexistent"]) == 2
    assert "model directory '/nonexistent' has no config.json" in capsys.readouterr().err
