"""Per-device bytes of every phase of a run, compiled ahead of time without building the model.

A run holds memory in phases that never overlap: the **train step** (one optimizer step over a
mini-batch, micro-batch by micro-batch), the learner's passes over the **whole rollout batch** (old /
reference log-probs and the mismatch metrics; the echo term's gradient norm), the **sampler** (its
decode copy of the weights and the KV cache of the decode rows, LUFFY's G - k rollouts per prompt) and
the **held-out sampler**. Each phase is the trainer's own jitted program (``learn_step.jit_train_step``,
``learn_step.make_batch_passes``, ``sampling.make_sampler`` as the trainer runs it), lowered for the
configured mesh on abstract parameters (``nnx.eval_shape`` + shardings; a ``model.path`` run reads
only its config.json) and measured by XLA's ``memory_analysis``: the program's arguments,
temporaries and outputs, plus what stays resident beside it (optimizer state, the KL reference, the
fp32 masters while the sampler reads its copy).

LoRA (``model.lora.rank > 0``, docs/lora.md): the trained parameters are the adapters, the frozen base
is an argument of every learner pass, the optimizer state is the adapters' only, there is no reference
copy (the base is the KL reference), and the sampler's decode copy is the adapters' plus, when the base
is not already in the decode dtype and layout, the base's.

Disaggregated (``mesh.sampler_devices`` = S > 0): the learner's phases are compiled on a learner mesh of the
other D - S devices (laid out by ``mesh.shape``, as ``sharding.split_devices`` splits them), the samplers on
the S sampler devices, which hold only the decode copy (pushed every step), the KV cache and, streaming,
the decode state; the learner's devices hold the training state and, while pushing, the copy program's
mirror of the decode layout (sampling/layout.py) as the ``weight push`` phase.

Each phase also records its work (flops and bytes per device, planner/cost.py and time.py) for the
predicted step time.

Compiled on CPU, a flash-style attention backend (``auto``, ``cudnn``, ``splash``) is planned with
``xla_chunked``, its stand-in here (planner/context.py), and the plan says so; XLA:CPU also upcasts bf16 operands of its dots to f32, which a GPU/TPU
does not, so CPU plans of bf16 runs are upper bounds. Run the planner on the accelerator host for
its exact numbers.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from echorl_jax.planner.cost import Cost, program_cost
from echorl_jax.planner.context import Context, context
from echorl_jax.planner.time import PEAKS, Part, StepTime, Work, decode_parts, decode_schedule, step_time

GB = 1e9
# Memory per chip as sold (decimal GB). A run needs headroom beyond the compiled program (runtime,
# fragmentation, XLA's own reserve): a phase "fits" within USABLE of it.
ACCELERATORS = {
    "h100": ("NVIDIA H100 80GB", 80 * GB),
    "a100": ("NVIDIA A100 80GB", 80 * GB),
    "h200": ("NVIDIA H200 141GB", 141 * GB),
    "v5e": ("TPU v5e 16GB", 16 * GB),
    "v5p": ("TPU v5p 95GB", 95 * GB),
    "v6e": ("TPU v6e 32GB", 32 * GB),
}
USABLE = 0.9


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase's bytes on device 0: its compiled program and what stays resident beside it."""

    name: str
    program: int  # arguments + temporaries + outputs - aliased
    resident: int  # arrays the program does not take but the run keeps (optimizer state, reference, masters)
    what: str = ""
    side: str = ""  # disaggregated: "learner" or "sampler", the mesh it runs on ("" colocated: every device)

    @property
    def peak(self) -> int:
        return self.program + self.resident


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes (device 0 of the mesh) of one configuration, phase by phase."""

    mesh_shape: dict
    rows_per_minibatch: int
    micro_batches: int  # padded: rl.micro_batches; packed: the most packed micro-batches a step scans
    params: int
    optimizer: int
    ref_params: int  # a frozen copy for the KL term (0 without KL, and with LoRA: the base is the reference)
    train_temp: int  # the train step's temporaries: activations, gradients, logits chunks
    phases: tuple[Phase, ...] = ()
    kv_cache: int = 0
    sample_temp: int = 0  # the sampler's temporaries, KV cache included
    decode_rows: int = 0  # the sampler's decode batch: the chosen slots, or N·G without refill
    kv_per_row: int = 0  # KV-cache bytes of one decode row over P + T' (whole, not per device)
    decode_copy: int = 0  # the sampler's copy of the parameters (0: it decodes from them directly)
    decode_tp: int = 1  # its tensor-parallel group size
    copy_temp: int = 0  # the copy program's temporaries (before sampling: no KV cache yet)
    cpu_bf16: bool = False  # compiled by XLA:CPU with bf16 compute (its f32 upcasts inflate the temporaries)
    refill: bool = False  # decode rows are refilled slots
    packed: bool = False  # micro-batches of packed rows (rl.pack_rows_per_micro_batch): at most micro_batches run
    remat: str = "none"
    attention: str = ""  # the backend compiled
    stand_in_for: str = ""  # the run's own backend where ``attention`` stands in for it (CPU), else ""
    adapters: int = 0  # LoRA: the trained adapters' bytes (part of ``params``; the optimizer state is theirs)
    base_copy: int = 0  # LoRA: the frozen base's part of the decode copy (0: decodes from the base itself)
    # streaming: the decode state (``stream_bytes``), resident through the learner's phases (disaggregated:
    # beside the sampler's, on its devices)
    stream_state: int = 0
    learner_devices: int = 0  # the learner mesh's devices (every device when colocated)
    sampler_devices: int = 0  # mesh.sampler_devices: the sampler mesh's (0: colocated)
    work: tuple[Work, ...] = ()  # per device and RL step, for the predicted step time (planner/time.py)
    push_bytes: int = 0  # disaggregated: the weights each sampler device receives per step
    overlap: bool = False  # disaggregated and streaming (rl.max_staleness >= 1): decode runs during the update

    def phase(self, name: str) -> Phase | None:
        return next((p for p in self.phases if p.name == name), None)

    @property
    def train_peak(self) -> int:
        return self.phase("train step").peak

    @property
    def sample_peak(self) -> int:
        ph = self.phase("sampler")
        return ph.peak if ph else 0

    @property
    def peak(self) -> int:
        return max(p.peak for p in self.phases)

    def fits(self, accel: str) -> bool:
        return self.peak <= USABLE * ACCELERATORS[accel][1]

    def step_time(self, accel: str) -> StepTime:
        """The roofline floor of one RL step on ``accel`` (planner/time.py): a prediction, not a measurement."""
        return step_time(self.work, PEAKS[accel], split=self.sampler_devices > 0, overlap=self.overlap,
                         push_bytes=self.push_bytes)  # fmt: skip


def program_bytes(memory) -> int:
    """A compiled program's own peak: arguments + temporaries + non-aliased outputs."""
    return memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes



# ----------------------------------------------------------------------------- the learner's phases


class LearnerMemory(NamedTuple):
    phases: tuple[Phase, ...]
    train_temp: int
    micro_batches: int
    packed: bool
    work: tuple[Work, ...] = ()  # per device and RL step (planner/time.py)


def learner_memory(cfg, ctx: Context) -> LearnerMemory:
    """The train step and the passes over the whole rollout batch, compiled as the trainer builds them."""
    import jax

    from echorl_jax.trainer import learn_step

    temperature = 1.0 if cfg.sampling.greedy else cfg.sampling.temperature
    rl = cfg.rl
    state_sh = jax.tree.map(lambda x: x.sharding, ctx.state)
    frozen_sh = None if ctx.frozen is None else jax.tree.map(lambda x: x.sharding, ctx.frozen)
    step = learn_step.jit_train_step(cfg, ctx.graphdef, ctx.optimizer, temperature, state_sh, ctx.mesh, frozen_sh)
    # The mini-batch (and with packing its plan; with LoRA the frozen base): one program whatever the lengths.
    inputs = learn_step.abstract_step_inputs(cfg, ctx.mesh, frozen=ctx.frozen)
    train = step.lower(ctx.state, *inputs).compile()
    train_mem = train.memory_analysis()
    rows_mb = learn_step.minibatch_rows(cfg)
    pack = learn_step.pack_spec(cfg, rows_mb, ctx.mesh)
    how = f"{pack.num_micro_batches} packed micro-batches at most" if pack else f"{rl.micro_batches} micro-batches"
    phases = [Phase("train step", program_bytes(train_mem), ctx.ref, f"{rows_mb} rows in {how}")]
    steps = rl.minibatches * rl.epochs
    work = [_work("train step", "learner", train, steps, f"{steps} optimizer step(s) per RL step")]

    forward_logp, echo_norm = learn_step.make_batch_passes(cfg, ctx.graphdef, temperature, ctx.mesh, state_sh.params)
    rows_all = rl.prompts_per_step * rl.group_size
    batch_all = learn_step.abstract_step_inputs(cfg, ctx.mesh, rows_all, frozen=ctx.frozen)  # LoRA: (batch, plan, base)
    resident = ctx.opt + ctx.ref  # the policy's parameters are an argument of both passes
    if forward_logp is not None:
        why = [w for w, on in (("old log-probs", rl.recompute_logp), ("reference log-probs", cfg.objective.kl_coef > 0),
                               ("mismatch metrics", cfg.train.mismatch_every > 0)) if on]  # fmt: skip
        b = batch_all[0]
        plan = () if len(batch_all) == 1 or batch_all[1] is None else (batch_all[1],)
        compiled = forward_logp.lower(ctx.policy, b.tokens_bs, b.valid_bs, *plan).compile()
        phases.append(Phase("log-prob pass", program_bytes(compiled.memory_analysis()), resident,
                            f"{rows_all} rows: {', '.join(why)}"))  # fmt: skip
        every = cfg.train.mismatch_every
        runs = (1.0 if rl.recompute_logp else 1 / every if every else 0.0) + (cfg.objective.kl_coef > 0)
        work.append(_work("log-prob pass", "learner", compiled, runs, f"{runs:g} per RL step"))
    if echo_norm is not None:
        compiled = echo_norm.lower(ctx.state.params, *batch_all).compile()
        phases.append(Phase("echo diagnostic", program_bytes(compiled.memory_analysis()), resident,
                            f"{rows_all} rows, every {cfg.train.echo_grad_norm_every} steps"))  # fmt: skip
        work.append(_work("echo diagnostic", "learner", compiled, 1 / cfg.train.echo_grad_norm_every,
                          f"1/{cfg.train.echo_grad_norm_every} per RL step"))  # fmt: skip
    return LearnerMemory(tuple(phases), train_mem.temp_size_in_bytes,
                         rl.micro_batches if pack is None else pack.num_micro_batches, pack is not None,
                         tuple(work))  # fmt: skip


def _work(name: str, side: str, compiled, runs: float, what: str) -> Work:
    """A compiled program run ``runs`` times per RL step (its loops counted, planner/cost.py)."""
    c = program_cost(compiled)
    return Work(name, side, (Part(runs, c.flops, c.bytes),), what)


# ----------------------------------------------------------------------------- the samplers


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
    base_copy: int = 0  # LoRA: the frozen base's part of ``decode_copy`` (``lora_copies``)
    prefill: Cost = Cost()  # the compiled sampler without its decode loops: prefill, first draw, cache set-up
    copy_cost: Cost = Cost()  # the copy program (0: none compiled)
    decode: tuple[Part, ...] = ()  # one decode step per distinct extent x its iterations (``decode_work``)
    weights: int = 0  # the decode layout's weights on each device, copied or not


def sampler_memory(cfg, mesh, mcfg, graphdef, params, *, memory: int | None = None, sampling=None,
                   prompts: int | None = None, group: int | None = None,
                   split: bool = False) -> SamplerMemory:  # fmt: skip
    """Compiles a sampler of ``cfg`` on ``mesh`` for abstract ``params`` (training layout) as the trainer
    runs it: its memory plan (decode layout, rows from ``sampling.slots`` / ``sampling.kv_cache_memory``;
    ``memory`` = bytes per device for fractions and auto tensor parallelism), then the decode copy's
    abstract form lowered with full-width prompts. Default: the training sampler (``prompts_per_step``
    prompts x G - k rollouts); ``sampling`` / ``prompts`` / ``group`` give the held-out one. ``split``: a
    sampler mesh of its own (``mesh`` holds the sampler's devices): the copy is pushed to it, always there,
    and no copy program runs on it."""
    import jax
    import jax.numpy as jnp

    from echorl_jax import config as config_lib, sharding
    from echorl_jax.sampling.layout import copy_bytes_per_device
    from echorl_jax.sampling.sampler import kv_bytes_per_slot, make_sampler

    sampling = sampling or cfg.sampling
    group = group or cfg.rl.group_size - cfg.objective.expert_per_group
    n, p = prompts or cfg.rl.prompts_per_step, cfg.data.max_prompt_len
    sampler = make_sampler(graphdef, sampling, group_size=group, stop_ids=(0,), pad_id=0, mesh=mesh,
                           device_memory=memory)  # fmt: skip
    try:
        sp = sampler.prepare(params, p)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    rep = sharding.replicated(sp.layout.mesh or mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    compiled = sampler.lower(
        sp.layout.abstract(params), jax.ShapeDtypeStruct((n, p), jnp.int32, sharding=rep),
        jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rep), jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
    ).compile()  # fmt: skip
    mem = compiled.memory_analysis()
    weights = copy_bytes_per_device(params, sp.layout.mesh, mcfg.compute_dtype)
    copy_temp, copy_cost, copy_bytes = 0, Cost(), weights if split else sp.copy_bytes
    if sp.copy_bytes and not split:
        copy = sp.layout.lower(params).compile()
        copy_temp, copy_cost = copy.memory_analysis().temp_size_in_bytes, program_cost(copy)
    rows, refill = sp.rows(n * group)
    decode = decode_work(mcfg, sp, sampling.max_new_tokens, p, sampler.block, rows, n * group, refill, weights)
    return SamplerMemory(kv_cache=sp.kv_bytes(n * group), decode_copy=copy_bytes, temp=mem.temp_size_in_bytes,
                         peak=program_bytes(mem), copy_temp=copy_temp, rows=rows, refill=refill,
                         tensor_parallel=sp.layout.tensor_parallel,
                         kv_per_row=kv_bytes_per_slot(mcfg, p, sampling.max_new_tokens), prefill=program_cost(compiled),
                         copy_cost=copy_cost, decode=decode, weights=weights)  # fmt: skip


def decode_work(mcfg, sp, t_max: int, prompt_len: int, block: int, rows: int, rollouts: int, refill: bool,
                weights: int) -> tuple[Part, ...]:  # fmt: skip
    """The decode loops' work per device (planner/time.decode_parts): one step reads the device's decode
    weights and its rows' live KV columns. Per device of a tensor-parallel group of tp: ``rows / groups``
    rows, the heads and the vocabulary split over tp when it divides them, as the logical-axis rules do.
    An input embedding of its own (untied) is gathered, not multiplied: left out of the weights a step reads."""
    import jax.numpy as jnp

    from echorl_jax.sampling.decode import block_buckets, response_columns

    tp, groups = sp.layout.tensor_parallel, sp.layout.groups
    waves = -(-rollouts // rows) if refill else 1
    buckets = block_buckets(response_columns(t_max, block) // block)
    steps = decode_schedule(t_max, block, prompt_len, buckets, refill, waves)
    kv_per_column = sp.kv_row_bytes / (prompt_len + response_columns(t_max, block))  # this device's share
    heads = mcfg.num_heads // tp if mcfg.num_heads % tp == 0 else mcfg.num_heads
    attn = 4 * mcfg.num_layers * heads * mcfg.dim_per_head  # q.k and p.v per key column and row
    itemsize = jnp.dtype(mcfg.compute_dtype).itemsize
    embed = 0 if mcfg.tie_embeddings else mcfg.vocab_size * mcfg.hidden_size // (tp if mcfg.vocab_size % tp == 0 else 1)
    read = weights - embed * itemsize
    return decode_parts(steps, rows // groups, read, read / itemsize, kv_per_column, attn)


def stream_bytes(cfg, sm: SamplerMemory, ctx: Context) -> tuple[int, int]:
    """Streaming rollouts (``rl.max_staleness >= 1``, sampling/stream.py): per-device bytes of the decode state
    that stays resident between sampling phases, as ``(slots, pool)``: the slots' KV cache (the sampler's
    own KV, ``sm.kv_cache``) and the pool: per entry (Q = ``rl.stream_batches`` x N) its prompt KV over P
    columns, last logits, prompt and mask; per rollout its buffers (tokens, mask, log-probs, entropy,
    versions: 17 bytes per response position) and bookkeeping (key, order, forced stop, ends: 22 bytes).
    Rows are split over the decode layout's groups, the bookkeeping replicated. (0, 0) without streaming."""
    import jax.numpy as jnp

    rl = cfg.rl
    if rl.max_staleness == 0:
        return 0, 0
    q = rl.stream_batches * rl.prompts_per_step
    r = q * (rl.group_size - cfg.objective.expert_per_group)
    m, p, t = ctx.mcfg, cfg.data.max_prompt_len, cfg.sampling.max_new_tokens
    groups = max(ctx.mesh.size // sm.tensor_parallel, 1)
    prompt_kv = 2 * m.num_layers * m.num_kv_heads * m.dim_per_head * p * jnp.dtype(m.compute_dtype).itemsize
    split = q * (prompt_kv + 4 * m.vocab_size + 5 * p) + r * t * 17  # rows over the groups
    return sm.kv_cache, -(-split // groups) + q * 5 + r * 22  # bookkeeping: replicated


def sampler_phase(name: str, sm: SamplerMemory, ctx: Context, what: str, split: bool = False) -> Phase:
    """While sampling, the optimizer state and the reference stay resident, and the fp32 masters too when
    the sampler reads a decode copy; the copy is made before the KV cache exists (its own temporaries).
    LoRA: ``sm`` from ``lora_copies``; the originals of what was copied stay resident. ``split``: a sampler
    mesh of its own holds none of the training state, only the pushed copy (an argument of the program)."""
    if split:
        return Phase(name, max(sm.peak, sm.decode_copy), 0, what, side="sampler")
    resident = ctx.opt + ctx.ref + (ctx.params if sm.decode_copy else 0)
    if ctx.frozen is not None:
        resident = ctx.opt + (ctx.adapters if sm.decode_copy > sm.base_copy else 0) + \
            (ctx.params - ctx.adapters if sm.base_copy else 0)
    return Phase(name, max(sm.peak, sm.decode_copy + sm.copy_temp), resident, what)


def lora_copies(sm: SamplerMemory, ctx: Context, split: bool = False) -> SamplerMemory:
    """LoRA (trainer/setup.py ``Setup.decode_weights``): the adapters and the frozen base are copied apart, each
    only when its decode dtype or layout differs (a bf16 base with bf16 compute on one device is decoded
    from as it is); ``sm`` computed for the whole policy as one tree is corrected to that. ``split``: both
    are on the sampler mesh (the base pushed once, the adapters every step); nothing is copied there."""
    from echorl_jax.sampling.layout import DecodeLayout, copy_bytes_per_device

    layout = DecodeLayout(ctx.mesh, sm.tensor_parallel, ctx.mcfg.compute_dtype)
    if split:
        return dataclasses.replace(sm, base_copy=copy_bytes_per_device(ctx.frozen, layout.mesh, layout.dtype))

    def copy(state):  # (bytes per device, the copy program's temporaries, its cost)
        if not layout.needs_copy(state):
            return 0, 0, Cost()
        compiled = layout.lower(state).compile()
        return (copy_bytes_per_device(state, layout.mesh, layout.dtype), compiled.memory_analysis().temp_size_in_bytes,
                program_cost(compiled))  # fmt: skip

    (base, base_temp, base_cost), (adapters, adapter_temp, adapter_cost) = copy(ctx.frozen), copy(ctx.state.params)
    both = Cost(base_cost.flops + adapter_cost.flops, base_cost.bytes + adapter_cost.bytes)
    return dataclasses.replace(sm, decode_copy=base + adapters, base_copy=base, copy_temp=max(base_temp, adapter_temp),
                               copy_cost=both)


def eval_sampling(cfg):
    """The held-out sampler's settings (trainer/setup.py): the evaluation temperature, greedy at 0."""
    t = cfg.train.eval_temperature
    return dataclasses.replace(cfg.sampling, temperature=t if t > 0 else 1.0, greedy=t <= 0)


def sampler_phases(cfg, ctx: Context, memory: int | None = None) -> tuple[SamplerMemory, tuple[Phase, ...]]:
    """The training sampler and, with ``data.eval``, the held-out sampler (at most ``prompts_per_step``
    prompts per round, as trainer/setup.py sizes it, x ``train.eval_samples``). ``ctx``: the sampler's
    (``context(cfg, devices, sampler=True)``; the learner's when colocated)."""
    rl, k = cfg.rl, cfg.objective.expert_per_group
    split = cfg.mesh.sampler_devices > 0
    fix = (lambda m: m) if ctx.frozen is None else (lambda m: lora_copies(m, ctx, split))  # noqa: E731
    sm = fix(sampler_memory(cfg, ctx.mesh, ctx.mcfg, ctx.graphdef, ctx.policy, memory=memory, split=split))
    how = f"{sm.rows} decode rows" + (" refilled" if sm.refill else "")
    phase = sampler_phase("sampler", sm, ctx, f"{rl.prompts_per_step} x {rl.group_size - k} rollouts, {how}", split)
    slots, pool = stream_bytes(cfg, sm, ctx)
    if pool:  # streaming: the pool's prompts and buffers beside the slots (which the sampler's own KV counts)
        phase = dataclasses.replace(phase, resident=phase.resident + pool,
                                    what=phase.what + f"; streaming pool of {rl.stream_batches * rl.prompts_per_step} "
                                    "prompt groups resident")  # fmt: skip
    phases = [phase]
    from echorl_jax.trainer.setup import eval_source

    if eval_source(cfg):
        em = fix(sampler_memory(cfg, ctx.mesh, ctx.mcfg, ctx.graphdef, ctx.policy, memory=memory,
                                sampling=eval_sampling(cfg), group=cfg.train.eval_samples, split=split))  # fmt: skip
        held = sampler_phase("held-out sampler", em, ctx,
                             f"{rl.prompts_per_step} x {cfg.train.eval_samples} rollouts, {em.rows} decode rows", split)
        if split and slots + pool:  # the stream's decode state stays on the sampler's devices through evaluation
            held = dataclasses.replace(held, resident=held.resident + slots + pool,
                                       what=held.what + "; + the streaming decode state")  # fmt: skip
        phases.append(held)
    return sm, tuple(phases)


def sampler_work(sm: SamplerMemory, split: bool) -> Work:
    """The training sampler's work per RL step: its compiled program without the decode loops (prefill), the
    decode steps (``decode_work``), and colocated the copy program. The held-out sampler is left out (it
    runs every ``train.eval_every`` steps)."""
    parts = [Part(1, sm.prefill.flops, sm.prefill.bytes), *sm.decode]
    if sm.copy_cost.flops or sm.copy_cost.bytes:
        parts.append(Part(1, sm.copy_cost.flops, sm.copy_cost.bytes))
    steps = int(sum(p.count for p in sm.decode))
    return Work("sampler", "sampler", tuple(parts), f"prefill + {steps} decode steps of {sm.rows} rows"
                + ("" if split or not sm.decode_copy else " + the decode copy"))  # fmt: skip


def push_phase(ctx: Context, tp: int) -> tuple[Phase, Work, int]:
    """Disaggregated: the learner casts and reshards the policy into a mirror of the decode layout on its own
    devices (sampling/layout.py), then every sampler device receives its slice. The learner's peak while
    pushing: the mirror copy and the copy program's temporaries beside the training state. LoRA: the base
    is pushed once per run (its mirror is that peak), the adapters every step (the work). Returns the phase,
    its work and the bytes each sampler device receives per step."""
    from echorl_jax.sampling.layout import DecodeLayout, copy_bytes_per_device

    if ctx.mesh.size % tp:
        from echorl_jax import config as config_lib

        raise config_lib.ConfigError(f"sampling.decode_tensor_parallel={tp} must divide the learner's device "
                                     f"count too ({ctx.mesh.size}): the push slices the weights on the learner's "
                                     "devices")  # fmt: skip
    layout = DecodeLayout(ctx.mesh, tp, ctx.mcfg.compute_dtype)
    compiled = layout.lower(ctx.policy).compile()
    mirror = copy_bytes_per_device(ctx.policy, layout.mesh, layout.dtype)
    each_step = ctx.policy if ctx.frozen is None else ctx.state.params  # LoRA: the adapters only
    per_step = compiled if ctx.frozen is None else layout.lower(ctx.state.params).compile()
    pushed = copy_bytes_per_device(each_step, layout.mesh, layout.dtype)
    phase = Phase("weight push", mirror + compiled.memory_analysis().temp_size_in_bytes, ctx.opt + ctx.ref + ctx.params,
                  "the decode copy cast on the learner's devices, then sent: "
                  + (f"{pushed / GB:.2f} GB" if pushed >= GB / 10 else f"{pushed / 1e6:.3f} MB") + " per sampler device",
                  side="learner")  # fmt: skip
    return phase, _work("weight push", "learner", per_step, 1, "the cast before the push"), pushed


# ----------------------------------------------------------------------------- the plan


def plan(cfg, devices=None, memory: int | None = None, learner: LearnerMemory | None = None) -> Plan:
    """Compiles every phase of ``cfg`` on ``devices`` (default: every visible one); ``memory``: bytes per
    device of the accelerator planned for (default: what the device reports); ``learner``: the learner's
    phases already compiled for this same configuration (planner/fit.py). With ``mesh.sampler_devices`` the
    learner's phases run on the learner's devices, the samplers' on the sampler's."""
    import jax
    import jax.numpy as jnp

    split = cfg.mesh.sampler_devices > 0
    ctx = context(cfg, devices)
    sctx = context(cfg, devices, sampler=True) if split else ctx
    lm = learner or learner_memory(cfg, ctx)
    sm, sphases = sampler_phases(cfg, sctx, memory)
    stream = sum(stream_bytes(cfg, sm, sctx))
    phases, work, pushed = lm.phases, lm.work, 0
    if split:  # the learner's phases on its own devices; the push is one of them
        push, push_work, pushed = push_phase(ctx, sm.tensor_parallel)
        phases = tuple(dataclasses.replace(ph, side="learner") for ph in phases) + (push,)
        work = work + (push_work,)
    elif stream:  # streaming: the decode state (slots' KV + pool) stays resident through the learner's phases
        phases = tuple(dataclasses.replace(ph, resident=ph.resident + stream,
                                           what=ph.what + "; + the streaming decode state") for ph in phases)  # fmt: skip
    run_attention = cfg.model.attention
    return Plan(
        mesh_shape=dict(ctx.mesh.shape), rows_per_minibatch=cfg.rl.prompts_per_step * cfg.rl.group_size // cfg.rl.minibatches,
        micro_batches=lm.micro_batches, packed=lm.packed, params=ctx.params, optimizer=ctx.opt, ref_params=ctx.ref,
        train_temp=lm.train_temp, phases=phases + sphases,
        kv_cache=sm.kv_cache, decode_rows=sm.rows, kv_per_row=sm.kv_per_row, refill=sm.refill,
        decode_copy=sm.decode_copy, decode_tp=sm.tensor_parallel, copy_temp=sm.copy_temp, sample_temp=sm.temp,
        cpu_bf16=jax.default_backend() == "cpu" and jnp.dtype(ctx.mcfg.compute_dtype) == jnp.bfloat16,
        remat=cfg.model.remat, attention=ctx.mcfg.attention, adapters=ctx.adapters, base_copy=sm.base_copy,
        stand_in_for=run_attention if ctx.mcfg.attention != run_attention else "", stream_state=stream,
        learner_devices=ctx.mesh.size, sampler_devices=sctx.mesh.size if split else 0,
        work=work + (sampler_work(sm, split),), push_bytes=pushed, overlap=split and cfg.rl.max_staleness >= 1,
    )  # fmt: skip
