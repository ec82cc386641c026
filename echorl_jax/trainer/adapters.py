"""LoRA in a run (``model.lora.rank > 0``): which weights train, the frozen base, and its identity.

After the model is loaded (and warm-started, which trains every weight, so LoRA and full fine-tuning
runs share one cached warm start) the adapters are attached (models/lora.py) and the model splits in
two nnx States:

* ``params``: the adapters, the only thing the optimizer, the gradients and the checkpoints hold;
* ``frozen``: every base weight, read by each forward and never updated (``model.param_dtype``, so
  ``bfloat16`` keeps the frozen 7B base at 2 bytes per parameter while the adapters stay float32).

The KL reference policy is the base model with the adapters off: the ``frozen`` State under the base
model's graph (``ref_graphdef``), not a second copy of the weights.

A checkpoint of a LoRA run is meaningless on another base, so it records the base's identity
(``base_identity``: ``model.path``, the architecture and a fingerprint of every frozen weight's bits)
and a resume against different base weights is refused (``check_base``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, NamedTuple

from flax import nnx

from echorl_jax.models import lora as lora_lib
from echorl_jax.models.config import NUMERICS
from echorl_jax.trainer.run_state import ResumeMismatch, mismatch_message


class Split(NamedTuple):
    graphdef: Any  # the adapted model's graph (samplers, train step)
    params: nnx.State  # trained: the LoRA adapters
    frozen: nnx.State  # the base weights
    ref_graphdef: Any  # the base model's graph: the KL reference is nnx.merge(ref_graphdef, frozen)
    base_identity: dict[str, Any]


def attach(cfg, model, mesh, log: Callable[[str], None]) -> Split:
    """Adds ``cfg.model.lora``'s adapters to ``model`` (placed on ``mesh``) and splits it for training."""
    lc = cfg.model.lora
    ref_graphdef = nnx.graphdef(model)
    lora_lib.add_adapters(model, lc, seed=cfg.model.seed, mesh=mesh)
    graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
    identity = base_identity(cfg, model.cfg, frozen)
    n_adapter = sum(x.size for x in _leaves(params))
    n_base = sum(x.size for x in _leaves(frozen))
    log(f"LoRA: rank {lc.rank}, alpha {lc.alpha:g} (scale {lc.scale:g}) on {', '.join(lc.targets)}: "
        f"{n_adapter:,} trained parameters ({lc.param_dtype}), {n_base:,} frozen ({model.cfg.param_dtype}); "
        f"base fingerprint {identity['weights']}")  # fmt: skip
    return Split(graphdef, params, frozen, ref_graphdef, identity)


def _leaves(state: nnx.State) -> list:
    return list(nnx.to_pure_dict(state).values())


def base_identity(cfg, model_cfg, frozen: nnx.State) -> dict[str, Any]:
    """What a LoRA checkpoint was trained on: the base's path, architecture and weights (models/lora.py)."""
    fields = {k: v for k, v in dataclasses.asdict(model_cfg).items() if k not in NUMERICS}  # remat etc. may change
    arch = json.dumps(fields, sort_keys=True, default=str)
    return {
        "path": cfg.model.path,
        "config": hashlib.sha256(arch.encode()).hexdigest()[:16],
        "weights": lora_lib.weights_fingerprint(nnx.to_pure_dict(frozen)),
    }


def check_base(saved: dict | None, current: dict, workdir: str, step: int, *, resume: bool = True) -> None:
    """Raises ``ResumeMismatch`` when a LoRA checkpoint's base differs from the run's base model
    (``resume=False``: the checkpoint is being evaluated, not continued)."""
    what = {"path": "model.path", "config": "the base model's config", "weights": "the base model's weights"}
    if saved is None:
        why = "the checkpoint records no LoRA base model (it was not saved by a LoRA run)"
    else:
        diff = [f"  {what[k]}: {saved.get(k)!r} (saved) -> {current[k]!r} (now)" for k in what
                if saved.get(k) != current[k]]  # fmt: skip
        if not diff:
            return
        why = "its LoRA adapters were trained on another base model:\n" + "\n".join(diff)
    if not resume:
        raise ResumeMismatch(f"checkpoint {workdir!r} (step {step}): {why}")
    raise ResumeMismatch(mismatch_message(workdir, step, why))
