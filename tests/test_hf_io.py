"""Loading and exporting Hugging Face checkpoints: round trips, sharded files, dtypes, errors."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from echorl_jax.models.config import ModelConfig, ModelConfigError
from echorl_jax.models.hf import _LAYOUTS, CheckpointError, export_model, load_model
from echorl_jax.models.transformer import Transformer, positions_from_valid

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

V = 128
QWEN2_FILE = "model.safetensors"


def make_hf_checkpoint(path, family, **save_kwargs):
    """Random tiny HF model: qwen2 (tied, q/k/v bias) or llama (untied, GQA)."""
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)  # fmt: skip
    if family == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    else:
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.eval().save_pretrained(path, **save_kwargs)
    return model


def params(model):
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(model)).items()}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(tokens).long()).logits.float().numpy()


TOKENS = np.random.default_rng(0).integers(0, V, (2, 16)).astype(np.int32)


def our_logits(model, tokens=TOKENS):
    valid = np.ones_like(tokens, bool)
    return np.asarray(model(tokens, positions_from_valid(valid), valid)[0])


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2"))
    make_hf_checkpoint(path, "qwen2")
    return path


@pytest.fixture
def broken(qwen2_dir, tmp_path):
    """A fresh copy of the qwen2 checkpoint to damage."""
    path = str(tmp_path / "ckpt")
    shutil.copytree(qwen2_dir, path)
    return path


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_round_trip_through_transformers(family, tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    reference = make_hf_checkpoint(src, family)
    model = load_model(src)
    export_model(model, out)

    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert reloaded.config.tie_word_embeddings == (family == "qwen2")
    ref = torch_logits(reference, TOKENS)
    np.testing.assert_array_equal(torch_logits(reloaded.eval(), TOKENS), ref)  # bit-identical weights
    assert np.abs(our_logits(model) - ref).max() <= 1e-4
    assert_same_params(load_model(out), model)


def test_export_bfloat16_and_load_it(qwen2_dir, tmp_path):
    model = load_model(qwen2_dir)
    export_model(model, str(tmp_path), dtype="bfloat16")
    with open(tmp_path / QWEN2_FILE, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}

    as_bf16 = load_model(str(tmp_path), param_dtype="bfloat16")
    as_f32 = load_model(str(tmp_path))
    for k, v in params(model).items():
        want = v.astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(params(as_bf16)[k], want, err_msg=k)
        np.testing.assert_array_equal(params(as_f32)[k], want.astype(np.float32), err_msg=k)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_export_writes_tokenizer_and_special_ids(tmp_path, model_type):
    # echorl reads the tokenizer.json itself: transformers 5's AutoTokenizer loads any qwen2-typed
    # directory with Qwen2Tokenizer, whatever tokenizer_config.json says, re-splitting this tokenizer.
    from echorl_jax.models.tokenizer import load_hf_tokenizer
    from echorl_jax.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    qwen2 = model_type == "qwen2"
    cfg = ModelConfig(model_type=model_type, attention_bias=qwen2, tie_embeddings=False, vocab_size=V, head_dim=16)
    newline = tok.encode("\n", add_special_tokens=False)
    export_model(Transformer(cfg, rngs=nnx.Rngs(0)), str(tmp_path), tokenizer=tok, stop_ids=(2, newline, (7, 8)))
    text = "1+2=3\n 45\n"
    assert load_hf_tokenizer(str(tmp_path))(text)["input_ids"] == tok(text)["input_ids"]
    if not qwen2:
        assert transformers.AutoTokenizer.from_pretrained(str(tmp_path))(text)["input_ids"] == tok(text)["input_ids"]
    assert load_model(str(tmp_path)).cfg == cfg
    # config.json carries the special ids; generation_config.json every single-token stop (not (7, 8)).
    hf_cfg = transformers.AutoConfig.from_pretrained(str(tmp_path))
    assert (hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.pad_token_id) == (1, 2, 0)
    gen = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert gen.eos_token_id == [2, *newline] and (gen.bos_token_id, gen.pad_token_id) == (1, 0)


def test_export_rejects_unknown_dtype(qwen2_dir, tmp_path):
    with pytest.raises(ValueError, match="export dtype 'int8'"):
        export_model(load_model(qwen2_dir), str(tmp_path), dtype="int8")


@pytest.mark.parametrize("name, shape", [("wq", (8, 4, 6)), ("wo", (4, 6, 8)), ("bq", (4, 6)), ("w_down", (5, 8))])
def test_layout_slice_reads_match_full_transform(name, shape):
    """Reading a device's slice straight from the HF layout equals slicing the full transformed tensor."""
    layout = _LAYOUTS[name]
    rng = np.random.default_rng(0)
    hf = rng.normal(size=layout.hf_shape(shape)).astype(np.float32)
    full = layout.read(hf, shape, tuple(slice(None) for _ in shape))
    np.testing.assert_array_equal(layout.to_hf(full), hf)
    if name == "wq":  # HF q_proj [N*D, H]: head n, dim d, input h
        np.testing.assert_array_equal(full[2, 3, 5], hf[3 * 6 + 5, 2])
    for _ in range(20):
        idx = []
        for n in shape:
            a, b = sorted(rng.choice(n + 1, 2, replace=False))
            idx.append(slice(int(a), int(b)))
        np.testing.assert_array_equal(layout.read(hf, shape, tuple(idx)), full[tuple(idx)])


def test_sharded_checkpoint_with_index(tmp_path):
    single, sharded = str(tmp_path / "single"), str(tmp_path / "sharded")
    make_hf_checkpoint(single, "llama")
    make_hf_checkpoint(sharded, "llama", max_shard_size="40KB")
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    assert_same_params(load_model(sharded), load_model(single))

    os.remove(os.path.join(sharded, shards[1]))
    with pytest.raises(FileNotFoundError, match=f"shard '{shards[1]}'.*is missing"):
        load_model(sharded)


def test_overrides_apply(qwen2_dir):
    model = load_model(qwen2_dir, param_dtype="bfloat16", compute_dtype="bfloat16", remat="full")
    assert model.cfg.remat == "full" and model.wq[...].dtype == jax.numpy.bfloat16
    with pytest.raises(ModelConfigError, match=r"unknown model config override\(s\) \['hidden'\]"):
        load_model(qwen2_dir, hidden=3)


# --------------------------------------------------------------------------- tied embeddings


def _edit_tensors(path, edit):
    file = os.path.join(path, QWEN2_FILE)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_tied_lm_head_present_and_equal_is_accepted(broken, qwen2_dir):
    _edit_tensors(broken, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    assert_same_params(load_model(broken), load_model(qwen2_dir))


def test_tied_lm_head_that_differs_is_an_error(broken):
    _edit_tensors(broken, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(CheckpointError, match="tie_word_embeddings=true but tensor 'lm_head.weight' differs"):
        load_model(broken)


# --------------------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model directory '{tmp_path}/nope' does not exist"):
        load_model(str(tmp_path / "nope"))


def test_missing_config(broken):
    os.remove(os.path.join(broken, "config.json"))
    with pytest.raises(FileNotFoundError, match=f"model directory '{broken}' has no config.json"):
        load_model(broken)


def test_missing_safetensors(broken):
    os.remove(os.path.join(broken, QWEN2_FILE))
    with pytest.raises(FileNotFoundError, match=f"model directory '{broken}' has no model.safetensors"):
        load_model(broken)


def test_unsupported_model_type(broken):
    file = os.path.join(broken, "config.json")
    with open(file) as f:
        hf = json.load(f)
    with open(file, "w") as f:
        json.dump({**hf, "model_type": "gpt2"}, f)
    with pytest.raises(ModelConfigError, match="model_type 'gpt2' is not supported"):
        load_model(broken)


def test_missing_tensor(broken):
    _edit_tensors(broken, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    message = r"missing tensor 'model.layers.1.mlp.up_proj.weight' with shape \(96, 64\)"
    with pytest.raises(CheckpointError, match=message):
        load_model(broken)


def test_unexpected_tensor(broken):
    _edit_tensors(broken, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((96, 64), np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
        load_model(broken)


def test_shape_mismatch(broken):
    bad = np.zeros((16, 64), np.float32)  # 1 kv head's worth instead of 2
    _edit_tensors(broken, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": bad}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(16, 64\), expected \(32, 64\)",
    ):
        load_model(broken)


def test_corrupt_safetensors_file(broken):
    file = os.path.join(broken, QWEN2_FILE)
    with open(file, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_model(broken)
