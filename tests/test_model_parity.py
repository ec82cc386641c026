"""Logits of our Transformer vs transformers (torch, fp32, CPU) on tiny random checkpoints.

One checkpoint per family, each exercising that family's quirks: Llama with llama3
RoPE scaling, GQA and untied embeddings (and attention bias, which in transformers
also puts a bias on o_proj); Qwen2 with q/k/v bias and tied embeddings; Qwen3 with
q/k RMSNorm and head_dim != hidden / heads.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from echorl_jax.models.hf import load_model  # noqa: E402
from echorl_jax.models.transformer import init_cache, positions_from_valid  # noqa: E402

TOL = 1e-4
V = 128
_COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256)  # fmt: skip
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(
        **_COMMON,
        tie_word_embeddings=False,
        attention_bias=True,
        # head_dim 16 with theta 1e4: wavelengths 6..20k, so the high-, medium- and
        # low-frequency branches of llama3 scaling all occur for original length 64.
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64),  # fmt: skip
    ),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="default", rope_theta=1e6)),  # fmt: skip
    "qwen3": lambda: transformers.Qwen3Config(**{**_COMMON, "num_key_value_heads": 1}, head_dim=32,
                                              tie_word_embeddings=False),  # fmt: skip
}


def make_hf_checkpoint(path, family, seed=0):
    """Saves a random-weight HF model (every parameter, norms and biases included, randomised)."""
    config = FAMILIES[family]()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    model.eval()
    model.save_pretrained(path)
    return model


def hf_logits(model, tokens, mask=None):
    mask = np.ones_like(tokens) if mask is None else mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens).long(),
            attention_mask=torch.from_numpy(mask).long(),
            position_ids=torch.from_numpy(positions).long(),
        )
    return out.logits.float().numpy()


@nnx.jit
def forward(model, tokens, positions, valid, cache=None):
    return model(tokens, positions, valid, cache)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_checkpoint(path, request.param)
    return request.param, hf, load_model(str(path))


def test_config_matches_family(family):
    name, hf, model = family
    cfg = model.cfg
    assert cfg.model_type == name
    assert cfg.tie_embeddings == hf.config.tie_word_embeddings
    assert cfg.dim_per_head == (32 if name == "qwen3" else 16)
    assert cfg.rope_type == ("llama3" if name == "llama" else "default")
    assert cfg.qk_norm == (name == "qwen3")
    assert hasattr(model, "lm_head") != cfg.tie_embeddings
    assert hasattr(model, "bo") == (name == "llama")  # o_proj bias: llama attention_bias only


def test_full_forward_matches_transformers(family):
    name, hf, model = family
    tokens = np.random.default_rng(1).integers(0, V, (2, 24)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    positions = np.asarray(positions_from_valid(valid))
    ours, _ = forward(model, tokens, positions, valid)
    diff = np.abs(np.asarray(ours) - hf_logits(hf, tokens)).max()
    print(f"{name}: full forward max|dlogits|={diff:.2e}")
    assert diff <= TOL


def test_left_padded_prefill_and_decode_match_transformers(family):
    """Prefill a left-padded batch into the KV cache, then decode 8 tokens one at a time."""
    name, hf, model = family
    b, p, t = 3, 10, 8
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, V, (b, p + t)).astype(np.int32)
    mask = np.ones((b, p + t), bool)
    for row, pad in enumerate((0, 3, 7)):
        mask[row, :pad] = False
        tokens[row, :pad] = 0
    positions = np.asarray(positions_from_valid(mask))
    ref = hf_logits(hf, tokens, mask.astype(np.int64))

    full, _ = forward(model, tokens, positions, mask)
    cache = init_cache(model.cfg, b, p + t)
    steps = []
    logits, cache = forward(model, tokens[:, :p], positions[:, :p], mask[:, :p], cache)
    steps.append(logits)
    for i in range(p, p + t):
        logits, cache = forward(model, tokens[:, i : i + 1], positions[:, i : i + 1], mask[:, i : i + 1], cache)
        steps.append(logits)
    incremental = np.concatenate([np.asarray(x) for x in steps], axis=1)
    assert int(cache.pos) == p + t

    full_diff = np.abs(np.asarray(full) - ref)[mask].max()
    decode_diff = np.abs(incremental - ref)[mask].max()
    print(f"{name}: padded full max|dlogits|={full_diff:.2e}, prefill+decode max|dlogits|={decode_diff:.2e}")
    assert full_diff <= TOL
    assert decode_diff <= TOL
    assert np.isfinite(incremental).all()  # padding rows stay NaN-free
