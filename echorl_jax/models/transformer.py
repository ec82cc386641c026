"""Decoder-only transformer (Llama 3.x / Qwen2 / Qwen3) in Flax NNX.

Layer weights are stacked along a leading ``layers`` axis and the blocks run
under ``lax.scan``: compile time does not grow with depth and the KV cache is
one array per k/v. Every parameter carries ``logical_axes`` metadata that
``echorl_jax.sharding`` maps to mesh axes.

Shape letters: b batch, s new positions, k key positions (cache slots),
h hidden, n query heads, g kv heads, r heads per kv head, d head dim,
f mlp, v vocab, l layers.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from echorl_jax.models import attention as attn_lib, lora as lora_lib
from echorl_jax.models.config import ModelConfig
from echorl_jax.models.decode_attention import LiveKeys, decode_attention
from echorl_jax.sharding import constrain_rows


class KVCache(NamedTuple):
    """Decode cache. ``pos`` slots are filled; slot i of row b holds a real token iff ``valid_bk[b, i]``."""

    k_lbgkd: jax.Array  # per kv head, slots contiguous: decode attention reads [k, d] blocks
    v_lbgkd: jax.Array
    valid_bk: jax.Array  # bool
    pos: jax.Array  # int32 scalar: next slot to write


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = dtype or jnp.dtype(cfg.compute_dtype)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.dim_per_head)
    return KVCache(
        jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32)
    )


def _param(rngs: nnx.Rngs, shape, axes, std, dtype):
    init = jax.random.normal(rngs.params(), shape, jnp.float32) * std
    return nnx.Param(init.astype(dtype), logical_axes=axes)


def _const(shape, axes, value, dtype):
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=axes)


def rms_norm(x, weight, eps):
    # As in HF: normalise in float32, scale after casting back.
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    d = cfg.dim_per_head
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    if cfg.rope_type == "llama3":
        # Llama 3.1 frequency-dependent scaling: long wavelengths slowed by `factor`,
        # short ones kept, a smooth blend between.
        old = cfg.rope_original_max_position
        low_wavelen = old / cfg.rope_low_freq_factor
        high_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = jnp.where(medium, blended, scaled)
    return inv_freq


def apply_rope(x_bsnd, positions_bs, inv_freq):
    freqs = positions_bs.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
    cos = jnp.cos(freqs)[:, :, None, :].astype(x_bsnd.dtype)
    sin = jnp.sin(freqs)[:, :, None, :].astype(x_bsnd.dtype)
    x1, x2 = jnp.split(x_bsnd, 2, axis=-1)  # HF "rotate_half" (non-interleaved) layout
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# Remat policies (ModelConfig.remat). Names are checkpoint_name tags in the block: "qkv_proj" (q, k, v
# projections), "attn_out" (attention output, the input of the o projection).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input; recompute the block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep every weight matmul's output
    # keep the attention side (q/k/v and the attention output), recompute norms, o projection and the MLP:
    # a fraction of `dots`' memory (no [b, s, mlp] tensors) that skips re-projecting q/k/v and the
    # attention-weighted sum of values, whose cost grows with sequence length.
    "attn": jax.checkpoint_policies.save_only_these_names("qkv_proj", "attn_out"),
    # `dots` plus the attention output: only elementwise work and the attention's softmax are recomputed.
    "dots_attn": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attn_out"),
    ),
}


def remat_policy(name: str):
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={name!r} is invalid: allowed none, {', '.join(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


class Transformer(nnx.Module):
    """``model(tokens_bs, positions_bs, valid_bs, cache) -> (logits_bsv float32, cache)``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        # The backend that runs here (``auto`` resolved); an unavailable one fails now, at start-up.
        self.attention_impl = attn_lib.resolve(cfg.attention, cfg.compute_dtype)
        h, f, v, nl = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
        n, g, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        dt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        self.embed = _param(rngs, (v, h), ("vocab", "embed"), std, dt)
        self.wq = _param(rngs, (nl, h, n, d), ("layers", "embed", "heads", "head_dim"), std, dt)
        self.wk = _param(rngs, (nl, h, g, d), ("layers", "embed", "kv_heads", "head_dim"), std, dt)
        self.wv = _param(rngs, (nl, h, g, d), ("layers", "embed", "kv_heads", "head_dim"), std, dt)
        self.wo = _param(rngs, (nl, n, d, h), ("layers", "heads", "head_dim", "embed"), std, dt)
        if cfg.attention_bias:
            self.bq = _const((nl, n, d), ("layers", "heads", "head_dim"), 0.0, dt)
            self.bk = _const((nl, g, d), ("layers", "kv_heads", "head_dim"), 0.0, dt)
            self.bv = _const((nl, g, d), ("layers", "kv_heads", "head_dim"), 0.0, dt)
        if cfg.o_bias:
            self.bo = _const((nl, h), ("layers", "embed"), 0.0, dt)
        if cfg.qk_norm:
            self.q_norm = _const((nl, d), ("layers", "head_dim"), 1.0, dt)
            self.k_norm = _const((nl, d), ("layers", "head_dim"), 1.0, dt)
        self.attn_norm = _const((nl, h), ("layers", "norm"), 1.0, dt)
        self.mlp_norm = _const((nl, h), ("layers", "norm"), 1.0, dt)
        self.w_gate = _param(rngs, (nl, h, f), ("layers", "embed", "mlp"), std, dt)
        self.w_up = _param(rngs, (nl, h, f), ("layers", "embed", "mlp"), std, dt)
        self.w_down = _param(rngs, (nl, f, h), ("layers", "mlp", "embed"), std, dt)
        self.final_norm = _const((h,), ("norm",), 1.0, dt)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (h, v), ("embed", "vocab"), std, dt)

    LAYER_PARAMS = ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "q_norm", "k_norm", "attn_norm", "mlp_norm",
                    "w_gate", "w_up", "w_down")  # fmt: skip

    def _layer_params(self) -> dict[str, jax.Array]:
        cdt = jnp.dtype(self.cfg.compute_dtype)
        params = {k: getattr(self, k)[...].astype(cdt) for k in self.LAYER_PARAMS if hasattr(self, k)}
        return params | lora_lib.layer_adapters(self, cdt)  # LoRA A/B, stacked like their weights (models/lora.py)

    def __call__(self, tokens_bs, positions_bs, valid_bs, cache: KVCache | None = None,
                 logits_slice: tuple[int, int] | None = None, return_hidden: bool = False,
                 live: LiveKeys | None = None, segment_ids=None):  # fmt: skip
        """``live`` (one-token decode steps of the sampler): attention reads only the cache columns it
        names (``models/decode_attention.py``) and a key is visible iff ``valid_bk`` says so -- no
        causal cut at ``cache.pos`` (the slot-refill ring is not in time order); the caller keeps
        future columns invalid.
        ``logits_slice=(start, stop)`` computes the output layer on those positions only
        (training needs the response positions; the prompt's vocab-sized logits are never built).
        ``return_hidden`` returns the final-normed hidden states ``[b, s, h]`` (compute dtype) instead
        of logits: training applies ``output_head()`` chunk by chunk (models/logprobs.py).
        ``segment_ids`` ``[b, s]`` (packed rows, no cache): several sequences per row, ``1, 2, ...``
        in column order, ``0`` padding; attention stays inside a segment and ``positions_bs`` restart
        at 0 in each (rl/packing.py)."""
        cfg, impl = self.cfg, self.attention_impl
        cdt = jnp.dtype(cfg.compute_dtype)
        inv_freq = rope_inv_freq(cfg)
        s = tokens_bs.shape[1]

        # Attention mask: key slot j is visible to query i iff j <= start + i and valid_bk[b, j].
        roll = cache is None and segment_ids is None and attn_lib.needs_right_padding(impl)
        if roll:  # real tokens to column 0 (see models/attention.py), undone after the layers
            to_bs, back_bs = attn_lib.right_padding_order(valid_bs)
            tokens_bs, positions_bs, valid_bs = (attn_lib.take_columns(a, to_bs)
                                                 for a in (tokens_bs, positions_bs, valid_bs))  # fmt: skip
        if cache is None:
            valid_bk, pos, start = valid_bs, None, 0
        else:
            pos = start = cache.pos
            valid_bk = jax.lax.dynamic_update_slice(cache.valid_bk, valid_bs, (0, pos))
        x = constrain_rows(self.embed[...].astype(cdt)[tokens_bs])
        lora_scale = getattr(self, "lora_scale", None)

        def block(carry, p):
            x, kc, vc, layer = carry
            x = constrain_rows(x)  # rows over the batch axes (sharding.constrain_rows)
            lora = lambda out, x_in, w: lora_lib.add_delta(out, x_in, p, w, lora_scale)  # noqa: E731  out + s·(x·A)·B
            y = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
            q = checkpoint_name(lora(jnp.einsum("bsh,hnd->bsnd", y, p["wq"]), y, "wq"), "qkv_proj")
            k = checkpoint_name(lora(jnp.einsum("bsh,hgd->bsgd", y, p["wk"]), y, "wk"), "qkv_proj")
            v = checkpoint_name(lora(jnp.einsum("bsh,hgd->bsgd", y, p["wv"]), y, "wv"), "qkv_proj")
            if cfg.attention_bias:
                q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
            if cfg.qk_norm:
                q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
                k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
            q = apply_rope(q, positions_bs, inv_freq)
            k = apply_rope(k, positions_bs, inv_freq)
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, g, s, d]
            if kc is None:
                k_all, v_all = k, v
            else:
                # Write this step's k/v into the cache carried through the scan (updated in place).
                kc = jax.lax.dynamic_update_slice(kc, k[None].astype(kc.dtype), (layer, 0, 0, pos, 0))
                vc = jax.lax.dynamic_update_slice(vc, v[None].astype(vc.dtype), (layer, 0, 0, pos, 0))
                if live is None:
                    k_all, v_all = kc[layer].astype(cdt), vc[layer].astype(cdt)
            if live is not None:  # one-token decode: read only the live cache columns
                attn = decode_attention(q, kc, vc, layer, valid_bk, live)
            else:
                attn = attn_lib.attention(q, k_all, v_all, valid_bk, q_start=start, impl=impl,
                                          segment_ids=segment_ids)
            attn = checkpoint_name(attn, "attn_out")
            out = lora(jnp.einsum("bsnd,ndh->bsh", attn, p["wo"]), attn, "wo")
            x = constrain_rows(x + (out + p["bo"] if cfg.o_bias else out))
            y = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
            mlp = constrain_rows(jax.nn.silu(lora(y @ p["w_gate"], y, "w_gate")) * lora(y @ p["w_up"], y, "w_up"))
            x = constrain_rows(x + lora(mlp @ p["w_down"], mlp, "w_down"))
            return (x, kc, vc, layer + 1), None

        if cfg.remat != "none":
            block = jax.checkpoint(block, policy=remat_policy(cfg.remat))

        kc = None if cache is None else cache.k_lbgkd
        vc = None if cache is None else cache.v_lbgkd
        (x, kc, vc, _), _ = jax.lax.scan(block, (x, kc, vc, jnp.zeros((), jnp.int32)), self._layer_params())
        if roll:
            x = attn_lib.take_columns(x, back_bs)
        if logits_slice is not None:
            x = x[:, logits_slice[0] : logits_slice[1]]
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        new_cache = None if cache is None else KVCache(kc, vc, valid_bk, pos + s)
        if return_hidden:
            return x, new_cache
        logits = jnp.einsum("bsh,hv->bsv", x, self.output_head().astype(cdt), preferred_element_type=jnp.float32)
        return logits, new_cache

    def output_head(self) -> jax.Array:
        """The output-layer weight ``[h, v]`` in the parameter dtype (the tied embedding, transposed)."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]


def positions_from_valid(valid_bs) -> jax.Array:
    """Left-padded rows: the first real token is position 0 (padding gets 0 too)."""
    return jnp.maximum(jnp.cumsum(valid_bs.astype(jnp.int32), axis=1) - 1, 0)


def logp_and_entropy(logits_bsv, targets_bs, temperature: float = 1.0):
    """Log-prob of ``targets`` and entropy of the full distribution, both under softmax(logits / T)."""
    logits = logits_bsv.astype(jnp.float32) / temperature
    logz = jax.nn.logsumexp(logits, axis=-1)
    logp_all = logits - logz[..., None]
    logp = jnp.take_along_axis(logp_all, targets_bs[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy
