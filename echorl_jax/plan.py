"""Memory planner: per-device bytes of a run, without building the model.

    python -m echorl_jax.plan --config CONFIG [--devices N] [--fit h100] [--config.section.key=value ...]

Ahead-of-time compiles the trainer's own train step (train.jit_train_step) and
sampler (sampling.make_sampler) for the configured mesh on abstract parameters
(``nnx.eval_shape`` + shardings; a ``model.path`` run reads only its
config.json), then prints per-device bytes: parameters, optimizer state, the
train step's temporaries (activations, gradients, logits chunks) and the
sampler's (KV cache included), and whether the larger of the two phases fits
each named accelerator. With ``--devices N`` and no accelerator, the mesh is N
fake CPU devices. ``--fit ACCEL`` also searches ``rl.micro_batches`` upward for
the smallest value whose train step fits ACCEL.

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
    sample_peak: int  # parameters + optimizer state stay resident while sampling
    decode_rows: int = 0  # the sampler's decode batch: sampling.slots, or N·G without refill
    kv_per_row: int = 0  # KV-cache bytes of one decode row over P + T (whole, not per device)
    adapters: int = 0  # LoRA: the trained adapters' bytes (part of ``params``; the optimizer state is theirs)

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


def abstract_params(mcfg, mesh, lora=None):
    """``(graphdef, params, frozen)`` whose leaves are ``ShapeDtypeStruct``s carrying their mesh shardings.
    ``lora`` (a LoraConfig with rank > 0): ``params`` are the adapters and ``frozen`` the base weights, as
    trainer/adapters.py splits them; otherwise ``params`` is every weight and ``frozen`` None."""
    import jax
    from flax import nnx

    from echorl_jax import sharding
    from echorl_jax.models import lora as lora_lib
    from echorl_jax.models.transformer import Transformer

    def build():
        model = Transformer(mcfg, rngs=nnx.Rngs(0))
        return lora_lib.add_adapters(model, lora) if lora is not None and lora.enabled else model

    graphdef, *states = nnx.split(nnx.eval_shape(build), *((nnx.LoRAParam, ...) if lora and lora.enabled else ()))
    for state in states:
        shapes = nnx.to_pure_dict(state)
        shards = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
        sds = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shards)
        nnx.replace_by_pure_dict(state, sds)
    return graphdef, states[0], states[1] if len(states) > 1 else None


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


def kv_cache_bytes(mcfg, mesh, rows: int, slots: int) -> int:
    """Per-device bytes of the sampler's k and v caches at their largest (``rows`` decode rows,
    ``slots = P + T`` cache slots each)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from echorl_jax import sharding

    shape = (mcfg.num_layers, -(-rows // sharding.batch_divisor(mesh)) * sharding.batch_divisor(mesh),
             mcfg.num_kv_heads, slots, mcfg.dim_per_head)  # fmt: skip
    spec = sharding.logical_to_spec((None, "batch", "kv_heads", None, "head_dim"), shape, mesh)
    one = jax.ShapeDtypeStruct(shape, jnp.dtype(mcfg.compute_dtype), sharding=NamedSharding(mesh, spec))
    return 2 * device_bytes(one)


# ----------------------------------------------------------------------------- the plan


def plan(cfg, devices=None) -> Plan:
    """Compiles the train step and the sampler of ``cfg`` on ``devices`` (default: every visible one)."""
    import jax
    import jax.numpy as jnp

    from echorl_jax import sharding
    from echorl_jax.rl import update
    from echorl_jax.sampling.sampler import decode_rows, kv_bytes_per_slot, make_sampler
    from echorl_jax.trainer import train

    devices = list(devices if devices is not None else jax.devices())
    if cfg.mesh.num_devices:
        devices = devices[: cfg.mesh.num_devices]
    mesh = sharding.make_mesh(cfg.mesh.shape, devices)
    mcfg = model_config(cfg)
    rl = cfg.rl
    graphdef, params, frozen = abstract_params(mcfg, mesh, cfg.model.lora)
    optimizer = update.make_optimizer(cfg.optim, max(cfg.train.steps * rl.epochs * rl.minibatches, 1))
    opt_state = abstract_opt_state(optimizer, params, mesh)
    rep = sharding.replicated(mesh)
    state = update.TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params, opt_state)

    rows = rl.prompts_per_step * rl.group_size // rl.minibatches
    p, t = cfg.data.max_prompt_len, cfg.sampling.max_new_tokens

    def batch_array(cols, dtype):
        return jax.ShapeDtypeStruct((rows, cols), dtype, sharding=sharding.batch_sharding(mesh, 2))

    f32 = jnp.float32
    batch = update.UpdateBatch(batch_array(p + t, jnp.int32), batch_array(p + t, bool), batch_array(t, bool),
                               batch_array(t, f32), batch_array(t, f32), batch_array(t, f32), batch_array(t, bool),
                               batch_array(t, bool) if cfg.objective.expert_per_group else None,  # LUFFY expert tokens
                               batch_array(t, f32) if "token_tis" in cfg.objective.rollout_correction else None)  # fmt: skip
    temperature = 1.0 if cfg.sampling.greedy else cfg.sampling.temperature
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    step = train.jit_train_step(cfg, graphdef, optimizer, temperature, state_sh, mesh, frozen_sh)
    train_mem = step.lower(state, batch, frozen).compile().memory_analysis()

    sampler = make_sampler(graphdef, cfg.sampling, group_size=rl.group_size, stop_ids=(0,), pad_id=0, mesh=mesh)
    n = rl.prompts_per_step
    key = jax.eval_shape(lambda: jax.random.key(0))
    sample_mem = sampler.lower(
        update.policy_params(params, frozen), jax.ShapeDtypeStruct((n, p), jnp.int32, sharding=rep), jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
    ).compile().memory_analysis()  # fmt: skip

    rows_kv = decode_rows(cfg.sampling, n * rl.group_size, sharding.batch_divisor(mesh))[0]
    param_bytes, opt_bytes = device_bytes(params), device_bytes(opt_state)
    adapter_bytes = param_bytes if frozen is not None else 0
    param_bytes += device_bytes(frozen) if frozen is not None else 0
    # The KL reference: a copy of the initial policy; with LoRA the frozen base itself (adapters off).
    ref = param_bytes if cfg.objective.kl_coef > 0 and frozen is None else 0
    return Plan(
        mesh_shape=dict(mesh.shape), rows_per_minibatch=rows, micro_batches=rl.micro_batches,
        params=param_bytes, optimizer=opt_bytes, ref_params=ref, adapters=adapter_bytes,
        train_temp=train_mem.temp_size_in_bytes, train_peak=_peak(train_mem) + ref,
        kv_cache=kv_cache_bytes(mcfg, mesh, rows_kv, p + t), decode_rows=rows_kv,
        kv_per_row=kv_bytes_per_slot(mcfg, p, t),
        sample_temp=sample_mem.temp_size_in_bytes, sample_peak=_peak(sample_mem) + opt_bytes + ref,
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

    devices = list(devices if devices is not None else jax.devices())
    mesh = sharding.make_mesh(cfg.mesh.shape, devices[: cfg.mesh.num_devices or len(devices)])
    tried = []
    for m in micro_batch_candidates(cfg, sharding.batch_divisor(mesh)):
        tried.append(plan(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, micro_batches=m)), devices))
        if tried[-1].fits(accel):
            return tried[-1], tried
    return None, tried


def format_plan(pl: Plan) -> str:
    def gb(x):
        return f"{x / GB:9.3f} GB" if x >= GB / 10 else f"{x / 1e6:9.3f} MB"

    lines = [
        f"mesh {pl.mesh_shape}; {pl.rows_per_minibatch} rows per optimizer step in {pl.micro_batches} micro-batch(es)",
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
        f"  KV cache              {gb(pl.kv_cache)}   (part of the sampler's temporaries; {pl.decode_rows} decode rows "
        f"x {gb(pl.kv_per_row).strip()} per row; sampling.slots sets the rows)",
        f"  sampler temporaries   {gb(pl.sample_temp)}",
        f"  sampling peak         {gb(pl.sample_peak)}   (parameters and optimizer state stay resident)",
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
