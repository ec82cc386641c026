"""Memory planner: per-device bytes of a run, without building the model.

    python -m echorl_jax.plan --config CONFIG [--devices N] [--fit h100] [--config.section.key=value ...]

Ahead-of-time compiles the trainer's own train step (train.jit_train_step) and
sampler (sampling.make_sampler, as the trainer runs it: on its decode copy of the
parameters with the decode rows its memory plan chooses, ``sampler_memory``) for
the configured mesh on abstract parameters (``nnx.eval_shape`` + shardings; a
``model.path`` run reads only its config.json), then prints per-device bytes:
parameters, optimizer state, the train step's temporaries (activations,
gradients, logits chunks), the KV cache, the decode copy and the sampler's
temporaries (KV cache included), and whether the larger of the two phases fits
each named accelerator. With ``--devices N`` and no accelerator, the mesh is N
fake CPU devices. ``--fit ACCEL`` also searches ``rl.micro_batches`` upward for
the smallest value whose train step fits ACCEL, and takes ACCEL's memory for a
``sampling.kv_cache_memory`` fraction and auto ``sampling.decode_tensor_parallel``.

Numbers are XLA's ``memory_analysis`` of the program compiled for *this*
platform: compiled on CPU, attention uses the CPU backend (the xla reference,
whose [B, heads, S, S] scores a GPU/TPU flash kernel never holds), so CPU
plans are upper bounds for long sequences; run the planner on the accelerator
host for its exact numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import NamedTuple

GB = 1e9
# Memory per chip as sold (decimal GB). A run needs headroom beyond the compiled program (runtime,
# fragmentation, XLA's own reserve): a phase "fits" within USABLE of it.
ACCELERATORS = {
    "h100": ("NVIDIA H100 80GB", 80 * GB),
    "h200": ("NVIDIA H200 141GB", 141 * GB),
    "v5e": ("TPU v5e 16GB", 16 * GB),
    "v5p": ("TPU v5p 95GB", 95 * GB),
    "v6e": ("TPU v6e 32GB", 32 * GB),
}
USABLE = 0.9


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes (device 0 of the mesh) of one configuration."""

    mesh_shape: dict
    rows_per_minibatch: int
    micro_batches: int
    params: int
    optimizer: int
    ref_params: int  # a frozen copy for the KL term (0 without KL, and with LoRA: the base is the reference)
    train_temp: int  # the train step's temporaries: activations, gradients, logits chunks
    train_peak: int  # arguments + temporaries + non-aliased outputs
    kv_cache: int
    sample_temp: int  # the sampler's temporaries, KV cache included
    sample_peak: int  # parameters + optimizer state (+ the decode copy) stay resident while sampling
    decode_rows: int = 0  # the sampler's decode batch: the chosen slots, or N·G without refill
    kv_per_row: int = 0  # KV-cache bytes of one decode row over P + T' (whole, not per device)
    decode_copy: int = 0  # the sampler's copy of the parameters (0: it decodes from them directly)
    decode_tp: int = 1  # its tensor-parallel group size
    copy_temp: int = 0  # the copy program's temporaries (before sampling: no KV cache yet)
    cpu_bf16: bool = False  # compiled by XLA:CPU with bf16 compute (its f32 upcasts inflate the sampler's temporaries)
    refill: bool = False  # decode rows are refilled slots
    packed: bool = False  # micro-batches of packed rows (rl.pack_rows_per_micro_batch): at most micro_batches run
    adapters: int = 0  # LoRA: the trained adapters' bytes (part of ``params``; the optimizer state is theirs)
    base_copy: int = 0  # LoRA: the frozen base's part of the decode copy (0: decodes from the base itself)

    @property
    def peak(self) -> int:
        return max(self.train_peak, self.sample_peak)

    def fits(self, accel: str) -> bool:
        return self.peak <= USABLE * ACCELERATORS[accel][1]


# ----------------------------------------------------------------------------- building blocks


def model_config(cfg):
    """The run's ModelConfig; for ``model.path`` from its config.json only (no weights are read)."""
    from echorl_jax import config as config_lib
    from echorl_jax.models.config import load_hf_config, numerics
    from echorl_jax.models.hub import resolve_config_dir
    from echorl_jax.trainer import setup

    if not cfg.model.path:
        return setup.model_config(cfg)
    return load_hf_config(resolve_config_dir(cfg.model.path), **numerics(cfg.model),
                          **config_lib.context_overrides(cfg.model))


def _place_abstract(state, mesh) -> None:
    """Replaces ``state``'s leaves (in place) by ``ShapeDtypeStruct``s carrying their mesh shardings."""
    import jax
    from flax import nnx

    from echorl_jax import sharding

    shapes = nnx.to_pure_dict(state)
    shards = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
    sds = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shards)
    nnx.replace_by_pure_dict(state, sds)


def abstract_params(mcfg, mesh):
    """``(graphdef, state)`` whose leaves are ``ShapeDtypeStruct``s carrying their mesh shardings."""
    from flax import nnx

    from echorl_jax.models.transformer import Transformer

    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))
    _place_abstract(state, mesh)
    return graphdef, state


def abstract_lora_params(mcfg, mesh, lora):
    """LoRA (``lora``: a LoraConfig with rank > 0): ``(graphdef, adapters, frozen)`` as trainer/adapters.py splits
    the adapted model, abstract and placed like ``abstract_params``."""
    from flax import nnx

    from echorl_jax.models import lora as lora_lib
    from echorl_jax.models.transformer import Transformer

    model = nnx.eval_shape(lambda: lora_lib.add_adapters(Transformer(mcfg, rngs=nnx.Rngs(0)), lora))
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
    for state in (adapters, frozen):
        _place_abstract(state, mesh)
    return graphdef, adapters, frozen


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


def _peak(memory) -> int:
    return memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes


@dataclasses.dataclass(frozen=True)
class SamplerMemory:
    """Per-device bytes of the sampler as the trainer runs it (``sampler_memory``)."""

    kv_cache: int  # the KV cache of the chosen decode rows
    decode_copy: int  # the decode copy of the parameters (0: the sampler reads the parameters themselves)
    temp: int  # the compiled sampler's temporaries (KV cache included)
    peak: int  # its arguments (decode copy, prompts) + temporaries + outputs
    copy_temp: int  # the copy program's temporaries (one layer's gather at most)
    rows: int
    refill: bool
    tensor_parallel: int
    kv_per_row: int  # one decode row over P + T' (whole, not per device)


def sampler_memory(cfg, mesh, mcfg, graphdef, params, *, memory: int | None = None) -> SamplerMemory:
    """Compiles the training sampler of ``cfg`` (G - k rollouts per prompt) on ``mesh`` for abstract
    ``params`` (training layout) as the trainer runs it: its memory plan (decode layout, rows from
    ``sampling.slots`` / ``sampling.kv_cache_memory``; ``memory`` = bytes per device for fractions and
    auto tensor parallelism), then the decode copy's abstract form lowered with full-width prompts."""
    import jax
    import jax.numpy as jnp

    from echorl_jax import config as config_lib, sharding
    from echorl_jax.sampling.sampler import kv_bytes_per_slot, make_sampler

    group = cfg.rl.group_size - cfg.objective.expert_per_group
    sampler = make_sampler(graphdef, cfg.sampling, group_size=group, stop_ids=(0,), pad_id=0, mesh=mesh,
                           device_memory=memory)  # fmt: skip
    n, p = cfg.rl.prompts_per_step, cfg.data.max_prompt_len
    try:
        sp = sampler.prepare(params, p)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    rep = sharding.replicated(sp.layout.mesh or mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    mem = sampler.lower(
        sp.layout.abstract(params), jax.ShapeDtypeStruct((n, p), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rep), jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
    ).compile().memory_analysis()  # fmt: skip
    copy_temp = sp.layout.lower(params).compile().memory_analysis().temp_size_in_bytes if sp.copy_bytes else 0
    rows, refill = sp.rows(n * group)
    return SamplerMemory(kv_cache=sp.kv_bytes(n * group), decode_copy=sp.copy_bytes, temp=mem.temp_size_in_bytes,
                         peak=_peak(mem), copy_temp=copy_temp, rows=rows, refill=refill,
                         tensor_parallel=sp.layout.tensor_parallel, kv_per_row=kv_bytes_per_slot(mcfg, p, cfg.sampling.max_new_tokens))  # fmt: skip


class LoraMemory(NamedTuple):
    """LoRA's per-device bytes beside ``SamplerMemory`` (``lora_memory``)."""

    adapters: int
    base_copy: int  # the frozen base's decode copy (0: the sampler decodes from the base itself)
    decode_copy: int  # what the sampler decodes from that is a copy: the base's and the adapters'
    copy_temp: int  # the copy programs' temporaries (the larger of the base's and the adapters')
    resident: int  # beside the sampler's arguments: the optimizer state and the originals of what was copied


def lora_memory(mcfg, mesh, adapters, frozen, tensor_parallel: int, opt_bytes: int) -> LoraMemory:
    """LoRA's memory around the sampler (trainer/setup.py ``Setup.decode_weights``: the adapters and the base are
    copied apart, each only when its decode dtype or layout differs; the copies are dropped after sampling)."""
    from echorl_jax.sampling.layout import DecodeLayout, copy_bytes_per_device

    layout = DecodeLayout(mesh, tensor_parallel, mcfg.compute_dtype)
    adapter_bytes = device_bytes(adapters)
    copied = lambda state: copy_bytes_per_device(state, layout.mesh, layout.dtype) if layout.needs_copy(state) else 0  # noqa: E731
    base_copy, adapter_copy = copied(frozen), copied(adapters)
    temp = lambda state, size: layout.lower(state).compile().memory_analysis().temp_size_in_bytes if size else 0  # noqa: E731
    copy_temp = max(temp(frozen, base_copy), temp(adapters, adapter_copy))
    resident = opt_bytes + (adapter_bytes if adapter_copy else 0) + (device_bytes(frozen) if base_copy else 0)
    return LoraMemory(adapter_bytes, base_copy, base_copy + adapter_copy, copy_temp, resident)


# ----------------------------------------------------------------------------- the plan


def plan(cfg, devices=None, memory: int | None = None) -> Plan:
    """Compiles the train step and the sampler of ``cfg`` on ``devices`` (default: every visible one);
    ``memory``: bytes per device of the accelerator planned for (default: what the device reports)."""
    import jax
    import jax.numpy as jnp

    from echorl_jax import sharding
    from echorl_jax.rl import update
    from echorl_jax.trainer import train

    devices = list(devices if devices is not None else jax.devices())
    if cfg.mesh.num_devices:
        devices = devices[: cfg.mesh.num_devices]
    mesh = sharding.make_mesh(cfg.mesh.shape, devices)
    mcfg = model_config(cfg)
    rl = cfg.rl
    if cfg.model.lora.enabled:  # params: the adapters; frozen: the base weights
        graphdef, params, frozen = abstract_lora_params(mcfg, mesh, cfg.model.lora)
    else:
        (graphdef, params), frozen = abstract_params(mcfg, mesh), None
    optimizer = update.make_optimizer(cfg.optim, max(cfg.train.steps * rl.epochs * rl.minibatches, 1))
    opt_state = abstract_opt_state(optimizer, params, mesh)
    rep = sharding.replicated(mesh)
    state = update.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params, opt_state)

    rows = rl.prompts_per_step * rl.group_size // rl.minibatches
    p, t = cfg.data.max_prompt_len, cfg.sampling.max_new_tokens
    temperature = 1.0 if cfg.sampling.greedy else cfg.sampling.temperature
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    step = train.jit_train_step(cfg, graphdef, optimizer, temperature, state_sh, mesh, frozen_sh)
    # The mini-batch (and with rl.pack_rows_per_micro_batch its packing plan): the step compiles for one
    # packed micro-batch of that many rows per device, whatever the lengths.
    train_mem = step.lower(state, *train.abstract_step_inputs(cfg, mesh, frozen)).compile().memory_analysis()
    pack = train.pack_spec(cfg, rows, mesh)

    sm = sampler_memory(cfg, mesh, mcfg, graphdef, update.policy_params(params, frozen), memory=memory)
    param_bytes, opt_bytes = device_bytes(params), device_bytes(opt_state)
    ref = param_bytes if cfg.objective.kl_coef > 0 else 0
    # While sampling, the masters, optimizer state and reference stay resident beside the sampler's
    # own arguments (the decode copy, or the masters themselves when no copy is made).
    resident = opt_bytes + ref + (param_bytes if sm.decode_copy else 0)
    adapter_bytes = base_copy = 0
    if frozen is not None:  # LoRA: no reference copy (the base is the reference); adapters and base copied apart
        lm = lora_memory(mcfg, mesh, params, frozen, sm.tensor_parallel, opt_bytes)
        adapter_bytes, base_copy, resident = lm.adapters, lm.base_copy, lm.resident
        sm = dataclasses.replace(sm, decode_copy=lm.decode_copy, copy_temp=lm.copy_temp)
        param_bytes, ref = adapter_bytes + device_bytes(frozen), 0
    return Plan(
        mesh_shape=dict(mesh.shape), rows_per_minibatch=rows,
        micro_batches=rl.micro_batches if pack is None else pack.num_micro_batches, packed=pack is not None,
        params=param_bytes, optimizer=opt_bytes, ref_params=ref, adapters=adapter_bytes, base_copy=base_copy,
        train_temp=train_mem.temp_size_in_bytes, train_peak=_peak(train_mem) + ref,
        kv_cache=sm.kv_cache, decode_rows=sm.rows, kv_per_row=sm.kv_per_row, refill=sm.refill,
        decode_copy=sm.decode_copy, decode_tp=sm.tensor_parallel, copy_temp=sm.copy_temp,
        cpu_bf16=jax.default_backend() == "cpu" and jnp.dtype(mcfg.compute_dtype) == jnp.bfloat16,
        sample_temp=sm.temp, sample_peak=max(sm.peak, sm.decode_copy + sm.copy_temp) + resident,
    )  # fmt: skip


def micro_batch_candidates(cfg, batch_divisor: int) -> list[int]:
    """``rl.micro_batches`` values (ascending) whose micro-batches keep whole rows on every device."""
    rows = cfg.rl.prompts_per_step * cfg.rl.group_size // cfg.rl.minibatches
    per_device = rows // batch_divisor
    return [m for m in range(1, per_device + 1) if per_device % m == 0]


def fit_micro_batches(cfg, accel: str, devices=None) -> tuple[Plan | None, list[Plan]]:
    """Plans with increasing ``rl.micro_batches`` until one fits ``accel``; ``(fitting plan or None, tried)``."""
    import jax

    from echorl_jax import sharding

    if cfg.rl.pack_rows_per_micro_batch:
        raise SystemExit("--fit searches rl.micro_batches, which packing replaces: drop --fit, or set "
                         "rl.pack_rows_per_micro_batch=0 to search padded micro-batches")  # fmt: skip
    devices = list(devices if devices is not None else jax.devices())
    mesh = sharding.make_mesh(cfg.mesh.shape, devices[: cfg.mesh.num_devices or len(devices)])
    tried = []
    for m in micro_batch_candidates(cfg, sharding.batch_divisor(mesh)):
        tried.append(plan(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, micro_batches=m)), devices,
                          ACCELERATORS[accel][1]))  # fmt: skip
        if tried[-1].fits(accel):
            return tried[-1], tried
    return None, tried


def format_plan(pl: Plan) -> str:
    def gb(x):
        return f"{x / GB:9.3f} GB" if x >= GB / 10 else f"{x / 1e6:9.3f} MB"

    lines = [
        f"mesh {pl.mesh_shape}; {pl.rows_per_minibatch} rows per optimizer step in "
        + (f"up to {pl.micro_batches} packed micro-batch(es)" if pl.packed else f"{pl.micro_batches} micro-batch(es)"),
        "per device:",
        f"  parameters            {gb(pl.params)}",
    ]
    if pl.adapters:
        lines.append(f"    of which LoRA adapters {gb(pl.adapters)}   (trained; the rest is the frozen base)")
    lines += [
        f"  optimizer state       {gb(pl.optimizer)}" + ("   (adapters only)" if pl.adapters else ""),
    ]
    if pl.ref_params:
        lines.append(f"  reference parameters  {gb(pl.ref_params)}")
    lines += [
        f"  train temporaries     {gb(pl.train_temp)}   (activations, gradients, logits chunks)",
        f"  train step peak       {gb(pl.train_peak)}",
        f"  KV cache              {gb(pl.kv_cache)}   (part of the sampler's temporaries; {pl.decode_rows} decode rows"
        f"{' refilled' if pl.refill else ', one per rollout'} x {gb(pl.kv_per_row).strip()} per row; "
        "sampling.kv_cache_memory or sampling.slots sets the rows)",
        f"  decode copy           {gb(pl.decode_copy)}   (the sampler's parameters in the compute dtype, tensor-parallel "
        f"over {pl.decode_tp} device(s), made before sampling with {gb(pl.copy_temp).strip()} of temporaries; "
        "0: decodes from the parameters)",
    ]
    if pl.adapters:
        lines.append(f"    of which the base's   {gb(pl.base_copy)}   (LoRA: 0 when the frozen base is already in the decode "
                     "dtype and layout: it is decoded from as it is)")
    lines += [
        f"  sampler temporaries   {gb(pl.sample_temp)}"
        + ("   (XLA:CPU upcasts bf16 weights to f32 for its dots, hoisted out of the decode loop: up to 2x the "
           "decode copy here that a GPU/TPU does not hold)" if pl.cpu_bf16 else ""),
        f"  sampling peak         {gb(pl.sample_peak)}   (parameters, optimizer state and the decode copy resident)",
        f"  peak                  {gb(pl.peak)}",
        f"fits ({USABLE:.0%} of memory):",
    ]
    for name, (label, cap) in ACCELERATORS.items():
        lines.append(f"  {name:5s} {label:20s} {'yes' if pl.fits(name) else 'no ':3s}  ({pl.peak / cap:6.1%} of {cap / GB:.0f} GB)")
    return "\n".join(lines)


def _force_devices(n: int) -> None:
    """Fake CPU devices for the mesh; must run before jax initialises its backends."""
    if "jax" in sys.modules:
        import jax

        if len(jax.devices()) != n:
            raise SystemExit(f"--devices {n}: jax is already initialised with {len(jax.devices())} devices")
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m echorl_jax.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a config file (configs/*.py)")
    ap.add_argument("--devices", type=int, default=0, help="plan for N fake CPU devices (no accelerator needed)")
    ap.add_argument("--fit", choices=sorted(ACCELERATORS), help="search rl.micro_batches until the run fits this chip")
    args, rest = ap.parse_known_args(argv)
    if args.devices:
        _force_devices(args.devices)

    from echorl_jax import cli, config as config_lib

    try:
        cfg = config_lib.build_config(config_lib.load_config_file(args.config), config_lib.parse_overrides(rest))
        return _run(cfg, args.fit)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except cli.user_errors() as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _run(cfg, fit: str | None) -> int:
    if not fit:
        print(format_plan(plan(cfg)))
        return 0
    found, tried = fit_micro_batches(cfg, fit)
    for pl in tried:
        print(format_plan(pl), end="\n\n")
    label = ACCELERATORS[fit][0]
    if found is None:
        print(f"no rl.micro_batches fits {label}: use rl.minibatches, a remat policy (model.remat), a smaller "
              "model.logits_chunk or more devices")  # fmt: skip
        return 1
    print(f"recommended for {label}: --config.rl.micro_batches={found.micro_batches}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
