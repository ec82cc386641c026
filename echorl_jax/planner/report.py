"""The printed plan: per-device bytes by array and by phase, and whether each accelerator holds it."""

from __future__ import annotations

from echorl_jax.planner import time as time_lib
from echorl_jax.planner.memory import ACCELERATORS, GB, USABLE, Plan


def gb(x: int) -> str:
    return f"{x / GB:9.3f} GB" if x >= GB / 10 else f"{x / 1e6:9.3f} MB"


def format_plan(pl: Plan, accel: str | None = None) -> str:
    """The plan as printed; ``accel``: the accelerator the predicted step time is broken down for (default:
    one line per accelerator)."""
    attn = pl.attention + (f" (standing in on CPU for {pl.stand_in_for}: a flash-style kernel holds no "
                           f"[rows, heads, S, S] scores either)" if pl.stand_in_for else "")  # fmt: skip
    lines = [
        f"mesh {pl.mesh_shape}; {pl.rows_per_minibatch} rows per optimizer step in "
        + (f"up to {pl.micro_batches} packed micro-batch(es)" if pl.packed else f"{pl.micro_batches} micro-batch(es)")
        + f"; model.remat={pl.remat}; attention compiled: {attn}",
    ]
    if pl.sampler_devices:
        lines.append(f"disaggregated (mesh.sampler_devices={pl.sampler_devices}): sampler mesh: {pl.sampler_devices} "
                     f"devices (decode only, tensor-parallel over {pl.decode_tp}), learner mesh: {pl.learner_devices} "
                     f"devices (laid out as {pl.mesh_shape}); [learner] / [sampler] below say where each phase runs; "
                     "the learner's devices hold the training state, the sampler's the pushed decode copy and the KV "
                     "cache")  # fmt: skip
    lines += [
        "per device" + (" (the learner's devices for the training state, the sampler's for the KV cache and decode "
                        "copy)" if pl.sampler_devices else "") + ":",
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
        f"over {pl.decode_tp} device(s), "
        + (f"pushed from the learner every step: {gb(pl.push_bytes).strip()} per sampler device)"
           if pl.sampler_devices else
           f"made before sampling with {gb(pl.copy_temp).strip()} of temporaries; 0: decodes from the parameters)"),
    ]
    if pl.stream_state:
        lines.append(f"  streaming state       {gb(pl.stream_state)}   (rl.max_staleness >= 1: slots' KV + the prompt pool, "
                     + ("resident on the sampler's devices beside its phases)" if pl.sampler_devices
                        else "resident beside every learner phase)"))  # fmt: skip
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
        side = f"[{ph.side}] " if ph.side else ""
        lines.append(f"  {ph.name:18s} {gb(ph.peak)}   ({side}program {gb(ph.program).strip()} + resident "
                     f"{gb(ph.resident).strip()}; {ph.what})")  # fmt: skip
    lines += [f"  peak               {gb(pl.peak)}", f"fits (every phase within {USABLE:.0%} of memory):"]
    for name, (label, cap) in ACCELERATORS.items():
        lines.append(f"  {name:5s} {label:20s} {'yes' if pl.fits(name) else 'no ':3s}  ({pl.peak / cap:6.1%} of {cap / GB:.0f} GB)")
    if pl.work:
        lines += format_time(pl, accel)
    return "\n".join(lines)


HOW = {"colocated": "sample + learn", "disaggregated, overlapped": "max(sample, learn) + push",
       "disaggregated, in turn": "sample + learn + push (rl.max_staleness=0: the sampler waits for the update)"}


def format_time(pl: Plan, accel: str | None = None) -> list[str]:
    """The predicted step time (planner/time.py): per accelerator, or broken down by phase for ``accel``."""
    lines = ["predicted (roofline floor, not a measurement: peak compute and HBM bandwidth, no collectives; "
             "every rollout runs to sampling.max_new_tokens; planner/time.py):"]  # fmt: skip
    for name in [accel] if accel else list(time_lib.PEAKS):
        t, peak = pl.step_time(name), time_lib.PEAKS[name]
        push = f", push {time_lib.seconds(t.push)}" if t.layout != "colocated" else ""
        lines.append(f"  {name:5s} step {time_lib.seconds(t.total):>8s} = sample {time_lib.seconds(t.sample)}, learn "
                     f"{time_lib.seconds(t.learn)}{push}   ({t.layout}: {HOW[t.layout]})")  # fmt: skip
        if not accel:
            continue
        link = f", push over {peak.link_name}: {pl.push_bytes / GB:.2f} GB per sampler device" if push else ""
        lines.append(f"        {peak.flops / 1e12:.0f} TFLOP/s bf16, {peak.hbm / 1e12:.2f} TB/s HBM{link}")
        for w in pl.work:
            flops, bytes_ = sum(p.count * p.flops for p in w.parts), sum(p.count * p.bytes for p in w.parts)
            bound = "memory" if bytes_ / peak.hbm > flops / peak.flops else "compute"
            lines.append(f"        [{w.side}] {w.name:16s} {time_lib.seconds(time_lib.work_time(w, peak)):>8s}   "
                         f"({flops / 1e12:.1f} TFLOP, {bytes_ / GB:.1f} GB per device, {bound}-bound; "
                         f"{w.what})")  # fmt: skip
    return lines


def phase_cells(pl: Plan, accel: str) -> str:
    """``name GB (x %)`` for every phase, for a markdown table (docs/recipes.md)."""
    cap = ACCELERATORS[accel][1]
    return "; ".join(f"{ph.name} {ph.peak / GB:.1f} ({ph.peak / cap:.0%})" for ph in pl.phases)
