"""The printed plan: per-device bytes by array and by phase, and whether each accelerator holds it."""

from __future__ import annotations

from echorl_jax.planner.memory import ACCELERATORS, GB, USABLE, Plan


def gb(x: int) -> str:
    return f"{x / GB:9.3f} GB" if x >= GB / 10 else f"{x / 1e6:9.3f} MB"


def format_plan(pl: Plan) -> str:
    attn = pl.attention + (f" (standing in on CPU for {pl.stand_in_for}: a flash-style kernel holds no "
                           f"[rows, heads, S, S] scores either)" if pl.stand_in_for else "")  # fmt: skip
    lines = [
        f"mesh {pl.mesh_shape}; {pl.rows_per_minibatch} rows per optimizer step in "
        + (f"up to {pl.micro_batches} packed micro-batch(es)" if pl.packed else f"{pl.micro_batches} micro-batch(es)")
        + f"; model.remat={pl.remat}; attention compiled: {attn}",
        "per device:",
        f"  parameters            {gb(pl.params)}",
    ]
    if pl.adapters:
        lines.append(f"    of which LoRA adapters {gb(pl.adapters)}   (trained; the rest is the frozen base)")
    lines.append(f"  optimizer state       {gb(pl.optimizer)}" + ("   (adapters only)" if pl.adapters else ""))
    if pl.ref_params:
        lines.append(f"  reference parameters  {gb(pl.ref_params)}")
    lines += [
        f"  train temporaries     {gb(pl.train_temp)}   (activations, gradients, logits chunks)",
        f"  KV cache              {gb(pl.kv_cache)}   ({pl.decode_rows} decode rows"
        f"{' refilled' if pl.refill else ', one per rollout'} x {gb(pl.kv_per_row).strip()} per row; "
        "sampling.kv_cache_memory or sampling.slots sets the rows)",
        f"  decode copy           {gb(pl.decode_copy)}   (the sampler's parameters in the compute dtype, tensor-parallel "
        f"over {pl.decode_tp} device(s), made before sampling with {gb(pl.copy_temp).strip()} of temporaries; "
        "0: decodes from the parameters)",
    ]
    if pl.stream_state:
        lines.append(f"  streaming state       {gb(pl.stream_state)}   (rl.max_staleness >= 1: slots' KV + the prompt pool, "
                     "resident beside every learner phase)")
    if pl.adapters:
        lines.append(f"    of which the base's   {gb(pl.base_copy)}   (LoRA: 0 when the frozen base is already in the decode "
                     "dtype and layout: it is decoded from as it is)")
    lines += [
        f"  sampler temporaries   {gb(pl.sample_temp)}   (KV cache included)"
        + ("; XLA:CPU upcasts bf16 weights to f32 for its dots: up to 2x the decode copy here that a GPU/TPU "
           "does not hold" if pl.cpu_bf16 else ""),
        "peak per phase (the program's arguments, temporaries and outputs + what stays resident beside it):",
    ]
    for ph in pl.phases:
        lines.append(f"  {ph.name:18s} {gb(ph.peak)}   (program {gb(ph.program).strip()} + resident "
                     f"{gb(ph.resident).strip()}; {ph.what})")  # fmt: skip
    lines += [f"  peak               {gb(pl.peak)}", f"fits (every phase within {USABLE:.0%} of memory):"]
    for name, (label, cap) in ACCELERATORS.items():
        lines.append(f"  {name:5s} {label:20s} {'yes' if pl.fits(name) else 'no ':3s}  ({pl.peak / cap:6.1%} of {cap / GB:.0f} GB)")
    return "\n".join(lines)


def phase_cells(pl: Plan, accel: str) -> str:
    """``name GB (x %)`` for every phase, for a markdown table (docs/recipes.md)."""
    cap = ACCELERATORS[accel][1]
    return "; ".join(f"{ph.name} {ph.peak / GB:.1f} ({ph.peak / cap:.0%})" for ph in pl.phases)
