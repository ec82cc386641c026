"""LoRA export round trips through transformers + PEFT (torch, fp32, CPU) on tiny random checkpoints.

``export_adapter`` must write a directory that ``peft.PeftModel.from_pretrained`` loads onto the
transformers model of the same base, giving our adapted logits; the merged export must load as a plain
transformers model with the same logits; and the file must hold the tensors PEFT itself saves.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from test_model_parity import hf_logits, make_hf_checkpoint  # noqa: E402

from echorl_jax.models import hf, lora, peft_export  # noqa: E402
from echorl_jax.models.transformer import positions_from_valid  # noqa: E402

TOL = 1e-4


def _randomize_adapters(model, seed=0):
    """Nonzero B (PEFT's init has B = 0, which would make any export look right)."""
    for i, (weight, _, _) in enumerate(lora.TARGETS.values()):
        if hasattr(model, lora.b_name(weight)):
            var = getattr(model, lora.b_name(weight))
            var.set_value(0.2 * jax.random.normal(jax.random.key(seed + i), var.get_value().shape))


def _ours(model, tokens, mask):
    valid = mask.astype(bool)
    logits, _ = model(tokens, positions_from_valid(valid), valid)
    return np.asarray(logits)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 128, (2, 12)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    return tokens, mask


@pytest.mark.parametrize("family,targets", [("qwen2", ("q", "k", "v", "o", "gate", "up", "down")),
                                            ("llama", ("q", "v", "o", "down")), ("qwen3", ("k", "o", "up"))])  # fmt: skip
def test_peft_adapter_loads_onto_transformers_with_our_logits(tmp_path, family, targets):
    make_hf_checkpoint(tmp_path / "base", family)
    model = hf.load_model(str(tmp_path / "base"))
    lcfg = lora.LoraConfig(rank=4, alpha=12.0, targets=targets)
    lora.add_adapters(model, lcfg, seed=1)
    _randomize_adapters(model)
    peft_export.export_adapter(model, str(tmp_path / "adapter"), lcfg.alpha, base_model=str(tmp_path / "base"))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 12.0 and config["peft_type"] == "LORA"
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager",
                                                             dtype=torch.float32)  # fmt: skip
    no_adapter = hf_logits(base, *_inputs())
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens, mask = _inputs()
    want, got = hf_logits(adapted, tokens, mask), _ours(model, tokens, mask)
    real = mask.astype(bool)  # padded positions are not compared (their attention rows differ by design)
    assert np.abs(want - no_adapter)[real].max() > 0.05  # PEFT applied the adapters
    np.testing.assert_allclose(got[real], want[real], atol=TOL, rtol=TOL)


def test_adapter_file_holds_exactly_what_peft_saves(tmp_path):
    """Key names, shapes and adapter_config fields against PEFT's own save of the same configuration."""
    hf_model = make_hf_checkpoint(tmp_path / "base", "qwen2")
    targets = ("q", "k", "v", "o", "gate", "up", "down")
    peft_cfg = peft.LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                               target_modules=[lora.TARGETS[t][1].split(".")[-1] for t in targets])  # fmt: skip
    peft.get_peft_model(hf_model, peft_cfg).save_pretrained(tmp_path / "theirs")
    model = hf.load_model(str(tmp_path / "base"))
    lora.add_adapters(model, lora.LoraConfig(rank=4, alpha=8.0, targets=targets))
    peft_export.export_adapter(model, str(tmp_path / "ours"), 8.0)
    theirs, ours = load_file(tmp_path / "theirs" / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert all(not v.any() for k, v in ours.items() if "lora_B" in k)  # B = 0 at init, as PEFT's
    theirs_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    ours_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key, value in ours_cfg.items():
        if key != "base_model_name_or_path":
            want = theirs_cfg[key]
            assert (sorted(value) == sorted(want)) if key == "target_modules" else value == want, key


def test_merged_export_loads_as_a_plain_transformers_model(tmp_path):
    make_hf_checkpoint(tmp_path / "base", "llama")
    model = hf.load_model(str(tmp_path / "base"))
    lora.add_adapters(model, lora.LoraConfig(rank=2, alpha=4.0), seed=2)
    _randomize_adapters(model, seed=5)
    hf.export_model(peft_export.merged_model(model), str(tmp_path / "merged"))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager",
                                                               dtype=torch.float32)  # fmt: skip
    tokens, mask = _inputs(1)
    real = mask.astype(bool)
    np.testing.assert_allclose(_ours(model, tokens, mask)[real], hf_logits(merged, tokens, mask)[real], atol=TOL,
                               rtol=TOL)  # fmt: skip
