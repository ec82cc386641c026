"""LoRA adapters out of the run: a PEFT adapter directory, or the merged model.

``export_adapter`` writes what ``peft.PeftModel.from_pretrained(base, out_dir)`` loads onto the
transformers model of the base checkpoint:

* ``adapter_config.json``: ``peft_type: LORA``, ``r``, ``lora_alpha`` (scale alpha / r, PEFT's), the
  target modules by their transformers names (``q_proj`` ... ``down_proj``), no dropout, no bias;
* ``adapter_model.safetensors``: ``base_model.model.model.layers.{i}.{module}.lora_A.weight [r, in]`` and
  ``lora_B.weight [out, r]`` per layer, torch ``Linear`` layout, heads flattened as transformers
  flattens them in ``q_proj.weight [heads * head_dim, hidden]`` (models/hf.py).

``merged_model`` folds the adapters into their weights (``W + s·A·B``, models/lora.py) and returns a plain
Transformer, which ``hf.export_model`` writes as a full checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from echorl_jax.models import lora as lora_lib
from echorl_jax.models.hf import _write_safetensors
from echorl_jax.models.transformer import Transformer
from echorl_jax.sharding import to_host

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers"


def adapter_targets(model: Transformer) -> list[str]:
    """The LoRA targets (q, k, ...) the model carries adapters for, in ``lora.TARGETS`` order."""
    return [t for t, (w, _, _) in lora_lib.TARGETS.items() if hasattr(model, lora_lib.a_name(w))]


def adapter_config(model: Transformer, alpha: float, base_model: str = "") -> dict[str, Any]:
    """The ``adapter_config.json`` fields PEFT reads (it fills every other field with its default)."""
    targets = adapter_targets(model)
    rank = getattr(model, lora_lib.a_name(lora_lib.TARGETS[targets[0]][0])).get_value().shape[-1]
    if not math.isclose(alpha / rank, model.lora_scale, rel_tol=1e-9):
        raise ValueError(f"lora alpha {alpha} / rank {rank} != the model's adapter scale {model.lora_scale}")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": int(rank),
        "lora_alpha": float(alpha),
        "lora_dropout": 0.0,
        "target_modules": [lora_lib.TARGETS[t][1].split(".")[-1] for t in targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _peft_entries(model: Transformer, dtype: np.dtype) -> list[tuple[str, str, int, tuple[int, ...], np.dtype]]:
    """(our variable, PEFT name, layer, PEFT shape, dtype) of every adapter tensor, in file order."""
    out = []
    for target in adapter_targets(model):
        weight, module, n_in = lora_lib.TARGETS[target]
        a = getattr(model, lora_lib.a_name(weight)).get_value()
        b = getattr(model, lora_lib.b_name(weight)).get_value()
        rank, d_in, d_out = a.shape[-1], math.prod(a.shape[1:-1]), math.prod(b.shape[2:])
        for i in range(a.shape[0]):
            out.append((lora_lib.a_name(weight), f"{PEFT_PREFIX}.{i}.{module}.lora_A.weight", i, (rank, d_in), dtype))
            out.append((lora_lib.b_name(weight), f"{PEFT_PREFIX}.{i}.{module}.lora_B.weight", i, (d_out, rank), dtype))
    return out


def export_adapter(model: Transformer, out_dir: str, alpha: float, *, base_model: str = "", tokenizer: Any = None) -> None:
    """Writes the PEFT adapter directory of ``model``'s adapters (module docstring). Every process of a
    multi-host run must call it (the adapters are gathered); process 0 writes."""
    if not lora_lib.has_adapters(model):
        raise ValueError("export_adapter: the model has no LoRA adapters")
    first = getattr(model, lora_lib.a_name(lora_lib.TARGETS[adapter_targets(model)[0]][0])).get_value()
    dtype = np.dtype(ml_dtypes.bfloat16) if first.dtype == jax.numpy.bfloat16 else np.dtype(np.float32)
    entries = _peft_entries(model, dtype)
    config = adapter_config(model, alpha, base_model)

    def tensors() -> Iterator[np.ndarray]:
        host: dict[str, np.ndarray] = {}
        for name, _, layer, _, _ in entries:
            if name not in host:
                if len(host) == 2:
                    host.clear()  # one target's stacked A and B on the host at a time
                host[name] = to_host(getattr(model, name).get_value())
            x = host[name][layer]
            # A [*in, r] -> [r, in]; B [r, *out] -> [out, r]
            flat = x.reshape(-1, x.shape[-1]) if name.startswith("lora_a_") else x.reshape(x.shape[0], -1)
            yield np.ascontiguousarray(flat.T).astype(dtype)

    if jax.process_index() != 0:
        for _ in tensors():  # take part in the gathers, write nothing
            pass
        return
    os.makedirs(out_dir, exist_ok=True)
    _write_safetensors(os.path.join(out_dir, ADAPTER_WEIGHTS), [(n, s, d) for _, n, _, s, d in entries], tensors())
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def merged_model(model: Transformer) -> Transformer:
    """A plain Transformer (no adapters) whose adapted weights are ``W + s·A·B``, on the model's shardings."""
    abstract = nnx.eval_shape(lambda: Transformer(model.cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, lora_lib.merged_state(model))
    return nnx.merge(graphdef, state)
