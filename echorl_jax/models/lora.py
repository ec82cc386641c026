"""LoRA adapters on the stacked-layer Transformer: frozen base weights, trained low-rank updates.

For a targeted projection ``W [L, *in, *out]`` (``wq [L, h, n, d]``, ``w_down [L, f, h]`` ...) the
model carries two ``nnx.LoRAParam`` variables, stacked over layers like ``W``:

    A [L, *in, r]   uniform(±1/sqrt(prod(in))), as PEFT's default (kaiming-uniform, a = sqrt(5))
    B [L, r, *out]  zeros, so the adapted model starts as the base model

and the block computes ``x·W + s·(x·A)·B`` with ``s = alpha / r`` (PEFT's scaling): the same function as
the merged weight ``W + s·A·B`` without ever building it. The adapters run inside the scanned block
(``models/transformer.py`` reads them with the layer weights), so sampling, the old/reference log-prob
passes and the train step all use one forward. ``nnx.LoRAParam`` subclasses ``nnx.Param``; the trainer
splits the model with ``nnx.split(model, nnx.LoRAParam, ...)`` into the trained adapters and the frozen
rest, and only the adapters reach the optimizer, the gradients and the checkpoints.

Why not ``nnx.LoRALinear`` or qwix: both attach adapters per module / per intercepted matmul. Our
weights are one ``[L, ...]`` array per projection consumed inside ``lax.scan``, where the per-layer slice
is a scan-body value rather than a module attribute: ``LoRALinear`` has no ``Linear`` to wrap, and
qwix's interception cannot trace a scanned slice back to its parameter (it would add no adapter, or
pick one by shape among wk/wv). Stacked ``LoRAParam`` variables keep the scan, its compile time and the
sharding rules (each adapter takes its base weight's logical axes; the rank axis is replicated).

Shape letters as in models/transformer.py; r is the LoRA rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import jax
import jax.numpy as jnp
from flax import nnx

# target -> (our weight, its Hugging Face module under model.layers.{i}, number of input dims after the layer axis)
TARGETS: dict[str, tuple[str, str, int]] = {
    "q": ("wq", "self_attn.q_proj", 1),
    "k": ("wk", "self_attn.k_proj", 1),
    "v": ("wv", "self_attn.v_proj", 1),
    "o": ("wo", "self_attn.o_proj", 2),
    "gate": ("w_gate", "mlp.gate_proj", 1),
    "up": ("w_up", "mlp.up_proj", 1),
    "down": ("w_down", "mlp.down_proj", 1),
}
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """``model.lora``: rank 0 = off (full fine-tuning)."""

    rank: int = 0  # r; 0 = no adapters, every weight trained
    alpha: float = 32.0  # scale s = alpha / rank (PEFT's lora_alpha)
    targets: tuple = ("q", "k", "v", "o", "gate", "up", "down")  # projections that get adapters
    # Refused unless 0: dropout on the learner's forward but not the sampler's makes pi_theta differ from
    # pi_old at the first update (the on-policy importance ratio is no longer 1; clipping fires on noise).
    dropout: float = 0.0
    param_dtype: str = "float32"  # the adapters' dtype (the frozen base keeps model.param_dtype)
    export_merged: bool = False  # also write workdir/hf_export: the merged model W + s*A*B (a full copy)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def validate(self, prefix: str = "model.lora") -> None:
        def bad(key, value, allowed):
            raise ValueError(f"config key {prefix}.{key}={value!r} is invalid: {allowed}")

        if self.rank < 0:
            bad("rank", self.rank, "must be >= 0 (0 = no LoRA: full fine-tuning)")
        if not self.enabled:
            return
        if self.alpha <= 0:
            bad("alpha", self.alpha, "must be > 0 (the adapter scale is alpha / rank)")
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in TARGETS]
        if not targets or unknown or len(set(targets)) != len(targets):
            bad("targets", self.targets, f"a non-empty list without repeats of {', '.join(TARGETS)}")
        if self.dropout != 0:
            bad("dropout", self.dropout, "LoRA dropout is not supported in RL: the learner's forward would differ "
                "from the sampler's, so the importance ratio is not 1 on-policy; use 0")  # fmt: skip
        if self.param_dtype not in DTYPES:
            bad("param_dtype", self.param_dtype, f"allowed: {DTYPES}")


def a_name(weight: str) -> str:
    return f"lora_a_{weight}"


def b_name(weight: str) -> str:
    return f"lora_b_{weight}"


def has_adapters(model: nnx.Module) -> bool:
    return getattr(model, "lora_scale", None) is not None


def add_adapters(model: nnx.Module, cfg: LoraConfig, *, seed: int = 0, mesh=None) -> nnx.Module:
    """Attaches ``A``/``B`` adapters for ``cfg.targets`` to ``model`` (in place) and returns it.

    With ``mesh``, each adapter is placed on the sharding its logical axes give (those of its base
    weight, rank replicated); works under ``nnx.eval_shape`` too (the planner's abstract model)."""
    if not cfg.enabled:
        raise ValueError("add_adapters: model.lora.rank is 0")
    if has_adapters(model):
        raise ValueError("add_adapters: the model already has LoRA adapters")
    dtype = jnp.dtype(cfg.param_dtype)
    key = jax.random.key(seed)
    for i, target in enumerate(cfg.targets):
        weight, _, n_in = TARGETS[target]
        var = getattr(model, weight)
        shape = var.get_value().shape
        axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
        l, dims_in, dims_out = shape[0], shape[1 : 1 + n_in], shape[1 + n_in :]
        bound = 1.0 / math.sqrt(math.prod(dims_in))
        a = jax.random.uniform(jax.random.fold_in(key, i), (l, *dims_in, cfg.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((l, cfg.rank, *dims_out), jnp.float32)
        a_axes = (axes[0], *axes[1 : 1 + n_in], None)
        b_axes = (axes[0], None, *axes[1 + n_in :])
        setattr(model, a_name(weight), _variable(a.astype(dtype), a_axes, mesh))
        setattr(model, b_name(weight), _variable(b.astype(dtype), b_axes, mesh))
    model.lora_scale = float(cfg.scale)
    return model


def _variable(x, axes, mesh) -> nnx.LoRAParam:
    if mesh is not None:
        from jax.sharding import NamedSharding

        from echorl_jax.sharding import logical_to_spec

        x = jax.device_put(x, NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh)))
    return nnx.LoRAParam(x, logical_axes=axes)


def layer_adapters(model: nnx.Module, dtype) -> dict[str, jax.Array]:
    """``{lora_a_wq: [L, h, r], lora_b_wq: [L, r, n, d], ...}`` in ``dtype``, for the scanned block."""
    if not has_adapters(model):
        return {}
    out = {}
    for weight, _, _ in TARGETS.values():
        for name in (a_name(weight), b_name(weight)):
            if hasattr(model, name):
                out[name] = getattr(model, name)[...].astype(dtype)
    return out


def delta(x, a, b, scale: float):
    """``s·(x·A)·B`` for one layer: ``x [..., *in]``, ``a [*in, r]``, ``b [r, *out]`` -> ``[..., *out]``."""
    xa = jnp.tensordot(x, a, axes=a.ndim - 1) * jnp.asarray(scale, x.dtype)
    return jnp.tensordot(xa, b, axes=1)


def add_delta(out, x, p: dict, weight: str, scale: float | None):
    """``out + s·(x·A)·B`` when the block's layer params ``p`` hold adapters for ``weight``, else ``out``."""
    if scale is None or a_name(weight) not in p:
        return out
    return out + delta(x, p[a_name(weight)], p[b_name(weight)], scale).astype(out.dtype)


def merged_weight(w, a, b, scale: float):
    """``W + s·A·B`` over stacked layers (float32 sum, ``W``'s dtype): ``w [L, *in, *out]``."""
    ab = jax.vmap(lambda a1, b1: jnp.tensordot(a1, b1, axes=1))(a.astype(jnp.float32), b.astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * ab).astype(w.dtype)


def merged_state(model: nnx.Module) -> dict:
    """The base model's parameters (a pure dict) with every adapted weight replaced by ``W + s·A·B``."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    merge = jax.jit(merged_weight, static_argnums=3)
    for weight, _, _ in TARGETS.values():
        if hasattr(model, a_name(weight)):
            a, b = getattr(model, a_name(weight))[...], getattr(model, b_name(weight))[...]
            params[weight] = merge(params[weight], a, b, model.lora_scale)
    return params


# ----------------------------------------------------------------------------- base-model identity


def _words_u32(x):
    """The bits of ``x`` as uint32 (16-bit types zero-extended), so equal arrays give equal words."""
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


def _mix(h):
    """murmur3's 32-bit finaliser: a well-spread uint32 per element index."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


@jax.jit
def _array_digest(x) -> jax.Array:
    """Two uint32 sums of ``word_i * mix(i + salt)``: integer sums wrap mod 2**32 and are associative, so the
    result is exact on any mesh and any reduction order (a float checksum would change with the mesh)."""
    words = _words_u32(x)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= x.shape[d]
    lanes = [jnp.sum(words * _mix(index + jnp.uint32(salt)), dtype=jnp.uint32) for salt in (0x9E3779B9, 0x7F4A7C15)]
    return jnp.stack(lanes)


def weights_fingerprint(params: dict) -> str:
    """A short hash of a pure dict of arrays: names, shapes, dtypes and every bit of every value.

    Cheap (one pass on device, two uint32 per array to the host) and independent of the mesh; it tells
    apart any two base models a run could be resumed against (not a cryptographic hash)."""
    from echorl_jax.sharding import to_host

    h = hashlib.sha256()
    for name in sorted(params):
        x = params[name]
        h.update(json.dumps([name, list(x.shape), str(x.dtype)]).encode())
        h.update(to_host(_array_digest(x)).tobytes())
    return h.hexdigest()[:16]
