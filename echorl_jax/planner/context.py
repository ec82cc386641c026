"""The abstract run the planner compiles against: the model's config, its parameters and optimizer state as
``ShapeDtypeStruct``s placed on the run's mesh (nothing allocated, no weights read), and the learner's and the
sampler's meshes (``mesh.sampler_devices`` splits the devices, ``sharding.split_devices``).

Compiled on CPU, a flash-style attention backend (``auto``, ``cudnn``, ``splash``) is planned with
``FLASH_STAND_IN`` (chunked queries, online softmax: no ``[rows, heads, S, S]`` scores).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

FLASH_STAND_IN = "xla_chunked"  # what a flash-style backend compiles as on CPU


def model_config(cfg, planning: bool = False):
    """The run's ModelConfig; for ``model.path`` from its config.json only (no weights are read).
    ``planning``: on CPU a flash-style attention backend becomes its stand-in (module docstring)."""
    import jax

    from echorl_jax import config as config_lib
    from echorl_jax.models.config import load_hf_config, numerics
    from echorl_jax.models.hub import resolve_config_dir
    from echorl_jax.trainer import setup

    if not cfg.model.path:
        mcfg = setup.model_config(cfg)
    else:
        mcfg = load_hf_config(resolve_config_dir(cfg.model.path), **numerics(cfg.model),
                              **config_lib.context_overrides(cfg.model))  # fmt: skip
    if planning and jax.default_backend() == "cpu" and mcfg.attention in ("auto", "cudnn", "splash"):
        mcfg = dataclasses.replace(mcfg, attention=FLASH_STAND_IN)
    return mcfg


def abstract_params(mcfg, mesh):
    """``(graphdef, state)`` whose leaves are ``ShapeDtypeStruct``s carrying their mesh shardings."""
    from flax import nnx

    from echorl_jax.models.transformer import Transformer

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))
    return graphdef, _placed(state, mesh)


def _placed(state, mesh):
    """``state`` (an abstract nnx State) with every leaf a ``ShapeDtypeStruct`` carrying its mesh sharding."""
    import jax
    from flax import nnx

    from echorl_jax import sharding

    shards = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
    sds = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nnx.to_pure_dict(state), shards)
    nnx.replace_by_pure_dict(state, sds)
    return state


def abstract_lora_params(mcfg, mesh, lora):
    """LoRA (``lora``: a LoraConfig with rank > 0): ``(graphdef, adapters, frozen)`` as trainer/adapters.py splits
    the adapted model, abstract and placed like ``abstract_params``."""
    from flax import nnx

    from echorl_jax.models import lora as lora_lib
    from echorl_jax.models.transformer import Transformer

    model = nnx.eval_shape(lambda: lora_lib.add_adapters(Transformer(mcfg, rngs=nnx.Rngs(0)), lora))
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
    return graphdef, _placed(adapters, mesh), _placed(frozen, mesh)


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ``ShapeDtypeStruct``s / arrays (the largest shard)."""
    import jax
    import numpy as np

    def one(x):
        shape = x.sharding.shard_shape(x.shape)
        return math.prod(shape) * np.dtype(x.dtype).itemsize

    return sum(one(x) for x in jax.tree.leaves(tree))


def abstract_opt_state(optimizer, params, mesh):
    """The optimizer state as the trainer places it (update.init_opt_state), abstract."""
    import jax

    from echorl_jax.rl import update

    shardings = update.opt_state_shardings(optimizer, params, mesh)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(optimizer.init, params), shardings)  # fmt: skip


class Context(NamedTuple):
    """What every phase of one configuration shares: the mesh and the abstract training state."""

    mesh: Any
    mcfg: Any
    graphdef: Any
    state: Any  # update.TrainState of ShapeDtypeStructs
    optimizer: Any
    params: int  # bytes per device (LoRA: the frozen base and the adapters)
    opt: int
    ref: int  # the KL reference copy (0 without KL, and with LoRA)
    frozen: Any = None  # LoRA: the frozen base (abstract; ``state.params`` holds the adapters)
    adapters: int = 0  # LoRA: the adapters' bytes per device

    @property
    def policy(self):
        """The whole policy's abstract State (LoRA: adapters + base), what samplers and log-prob passes read."""
        from echorl_jax.rl import update

        return update.policy_params(self.state.params, self.frozen)


SAMPLER_SHAPE = (1, -1, 1)  # the sampler mesh's parameter layout (its decode layout is what it decodes with)


def run_devices(cfg, devices=None) -> tuple[list, list]:
    """``(learner devices, sampler devices)`` of ``cfg`` on ``devices`` (default: every visible one; the first
    ``mesh.num_devices``): both are every device when colocated, else ``sharding.split_devices``'s split."""
    import jax

    from echorl_jax import config as config_lib, sharding

    devices = list(devices if devices is not None else jax.devices())
    if cfg.mesh.num_devices:
        devices = devices[: cfg.mesh.num_devices]
    if not cfg.mesh.sampler_devices:
        return devices, devices
    try:
        return sharding.split_devices(devices, cfg.mesh.sampler_devices)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None


def context(cfg, devices=None, sampler: bool = False) -> Context:
    """The learner's context, or with ``sampler`` the sampler's: the same unless ``mesh.sampler_devices``
    splits the devices (then the sampler's mesh holds the sampler devices, ``SAMPLER_SHAPE``)."""
    import jax
    import jax.numpy as jnp

    from echorl_jax import config as config_lib, sharding
    from echorl_jax.rl import update

    learner_devices, sampler_devices = run_devices(cfg, devices)
    split = cfg.mesh.sampler_devices > 0
    shape = SAMPLER_SHAPE if sampler and split else cfg.mesh.shape
    try:
        mesh = sharding.make_mesh(shape, sampler_devices if sampler else learner_devices)
    except ValueError as e:
        if not split:
            raise
        raise config_lib.ConfigError(f"mesh.shape={shape} on the {'sampler' if sampler else 'learner'}'s "
                                     f"{len(sampler_devices if sampler else learner_devices)} devices "
                                     f"(mesh.sampler_devices={cfg.mesh.sampler_devices}): {e}") from None  # fmt: skip
    mcfg = model_config(cfg, planning=True)
    rl = cfg.rl
    frozen = None
    if cfg.model.lora.enabled:  # params: the adapters; frozen: the base weights
        graphdef, params, frozen = abstract_lora_params(mcfg, mesh, cfg.model.lora)
    else:
        graphdef, params = abstract_params(mcfg, mesh)
    optimizer = update.make_optimizer(cfg.optim, max(cfg.train.steps * rl.epochs * rl.minibatches, 1))
    opt_state = abstract_opt_state(optimizer, params, mesh)
    step0 = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))
    state = update.TrainState(step0, params, opt_state)
    param_bytes = device_bytes(params)
    if frozen is not None:  # LoRA: no reference copy, the base is the reference
        return Context(mesh, mcfg, graphdef, state, optimizer, param_bytes + device_bytes(frozen),
                       device_bytes(opt_state), 0, frozen, param_bytes)  # fmt: skip
    return Context(mesh, mcfg, graphdef, state, optimizer, param_bytes, device_bytes(opt_state),
                   param_bytes if cfg.objective.kl_coef > 0 else 0)  # fmt: skip
