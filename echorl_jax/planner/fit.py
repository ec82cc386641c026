"""``--fit ACCEL``: the cheapest setting under which every phase of a run fits an accelerator.

The learner and the sampler are searched apart (their knobs do not interact):

* **Learner** (train step, log-prob pass, echo diagnostic): packed micro-batches of
  ``k = rl.pack_rows_per_micro_batch`` rows of P + T tokens per device, and a remat policy
  (``model.remat``). Recomputation costs every step, so the least of it wins: memory falls along
  ``REMAT_ORDER`` (none ... full), so a bisection at k = 1 finds the first policy that fits, then k
  doubles while it still fits (bigger micro-batches, fewer of them).
* **Sampler** (training and held-out): the decode copy's tensor parallelism is the sampler's own
  ``auto`` for ACCEL's memory (sampling/layout.py), and the KV cache gets what is left: one compile
  with a small probe budget measures everything but the cache, and ``sampling.kv_cache_memory``
  becomes the rest of USABLE x memory in bytes (rounded down to 0.1 GB on 16-141 GB chips; never more than one row per
  rollout needs), checked by compiling again. Bytes, not a fraction: a fraction is of what the device
  reports, which on GPU is JAX's allocator limit (``XLA_PYTHON_CLIENT_MEM_FRACTION``, 75 % by default).

Each trial is a full ahead-of-time compile of that phase at the run's shapes (tens of seconds for a 7B
model on CPU); the search is a handful of them.

``--fit ACCEL --split`` (``fit_split``) runs that search once per sampler/learner split
(``mesh.sampler_devices`` = S of the D devices; ``split_candidates``) and keeps the split whose predicted
step time (planner/time.py, a roofline floor) is lowest among those where both meshes fit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from echorl_jax.planner.context import context, run_devices
from echorl_jax.planner.memory import ACCELERATORS, GB, USABLE, Plan, learner_memory, plan, sampler_phases, stream_bytes
from echorl_jax.planner.time import StepTime

REMAT_ORDER = ("none", "dots_attn", "dots", "attn", "full")  # least recomputation first (models/transformer.py)
PROBE_BUDGET = 0.02  # the sampler's probe KV budget, a fraction of the accelerator's memory


@dataclasses.dataclass
class Fit:
    accel: str
    overrides: dict  # dotted key -> value: the setting found
    plan: Plan | None  # every phase under it (None: nothing fits)
    why: str = ""  # what did not fit, when nothing does


def _with(cfg, **sections):
    """``cfg`` with some fields of some sections replaced: ``_with(cfg, model={"remat": "full"})``."""
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


def fit(cfg, accel: str, devices=None, log: Callable[[str], None] = print) -> Fit:
    from echorl_jax import sharding

    memory = ACCELERATORS[accel][1]
    usable = USABLE * memory

    learned: dict[tuple[str, int], object] = {}  # (remat, rows) -> LearnerMemory

    def learner(remat: str, rows: int):
        if (remat, rows) not in learned:
            c = _with(base, model={"remat": remat}, rl={"pack_rows_per_micro_batch": rows})
            lm = learned[remat, rows] = learner_memory(c, context(c, devices))
            log(f"  learner, model.remat={remat}, {rows} packed row(s) per device per micro-batch: "
                f"{max(p.peak for p in lm.phases) / GB:.1f} GB")  # fmt: skip
        return learned[remat, rows]

    def fits(remat: str, rows: int) -> bool:
        return max(p.peak for p in learner(remat, rows).phases) <= usable

    # Learner: the least remat that fits one packed row per device (memory falls along REMAT_ORDER, so a
    # bisection), then the largest micro-batch.
    ctx = context(cfg, devices)
    per_device = cfg.rl.prompts_per_step * cfg.rl.group_size // cfg.rl.minibatches // sharding.batch_divisor(ctx.mesh)
    base = _with(cfg, rl={"pack_rows_per_micro_batch": 1, "micro_batches": 1})
    if not fits(REMAT_ORDER[-1], 1):
        return Fit(accel, {}, None, "the learner does not fit with full remat and one packed row per device per "
                   "micro-batch: more devices, a smaller model.logits_chunk, or shorter responses")  # fmt: skip
    lo, hi = 0, len(REMAT_ORDER) - 1  # REMAT_ORDER[hi] fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(REMAT_ORDER[mid], 1) else (mid + 1, hi)
    remat = REMAT_ORDER[hi]
    rows = 1
    while rows * 2 <= per_device and fits(remat, rows * 2):
        rows *= 2
    learner_found = {"model.remat": remat, "rl.pack_rows_per_micro_batch": rows, "rl.micro_batches": 1}
    chosen = _with(base, model={"remat": remat}, rl={"pack_rows_per_micro_batch": rows})
    lm = learner(remat, rows)

    # Sampler: measure everything but the KV cache at a probe budget; the cache gets the rest.
    probe = _with(chosen, sampling={"kv_cache_memory": PROBE_BUDGET, "slots": 0})
    sctx = context(probe, devices, sampler=True)
    sm, phases = sampler_phases(probe, sctx, memory)
    other = max(p.peak for p in phases) - sm.kv_cache
    room = usable - other
    if cfg.rl.max_staleness and not cfg.mesh.sampler_devices:
        # Colocated streaming: the slots' KV cache and the pool stay beside every learner phase too.
        room = min(room, usable - max(p.peak for p in lm.phases) - stream_bytes(probe, sm, sctx)[1])
    log(f"  sampler at a {PROBE_BUDGET:.0%} KV budget: {other / GB:.1f} GB besides the KV cache "
        f"(decode copy tensor-parallel over {sm.tensor_parallel})")  # fmt: skip
    rollouts = cfg.rl.prompts_per_step * (cfg.rl.group_size - cfg.objective.expert_per_group)
    every_row = sm.kv_cache / sm.rows * rollouts  # one row per rollout: no budget needs more
    # In bytes, not a fraction: a fraction is of what the device reports (on GPU, JAX's allocator limit).
    step = 10.0 ** (math.floor(math.log10(memory)) - 2)  # 0.1 GB for 16-141 GB chips
    budget = math.floor(min(room, every_row + step) / step) * step
    last = (PROBE_BUDGET * memory, max(p.peak for p in phases))  # (budget, peak) of the last compile
    for _ in range(4):
        if budget < sm.kv_cache / max(sm.rows, 1):
            return Fit(accel, learner_found, None, f"the sampler's weights and resident state leave no room for a KV "
                       f"cache ({other / GB:.1f} GB of {usable / GB:.1f} GB usable): more devices or tensor "
                       "parallelism (sampling.decode_tensor_parallel)")  # fmt: skip
        final = _with(chosen, sampling={"kv_cache_memory": budget, "slots": 0})
        pl = plan(final, devices, memory, learner=lm)
        log(f"  every phase, sampling.kv_cache_memory={budget / GB:g}e9: peak {pl.peak / GB:.1f} GB")
        if pl.fits(accel):
            found = {**learner_found, "sampling.kv_cache_memory": budget, "sampling.slots": 0,
                     "sampling.decode_tensor_parallel": pl.decode_tp}  # fmt: skip
            if cfg.mesh.sampler_devices:
                found["mesh.sampler_devices"] = cfg.mesh.sampler_devices
            return Fit(accel, found, pl)
        # Over: aim again along the line through the last two compiles. The peak can grow faster than the budget
        # (a split's held-out sampler holds its own cache beside the stream's, both sized by the budget).
        slope = max((pl.peak - last[1]) / max(budget - last[0], 1.0), 1.0)
        last = (budget, pl.peak)
        budget = math.floor((budget - (pl.peak - usable) / slope) / step) * step
    return Fit(accel, learner_found, None, "the sampler's budget search did not converge")


def split_candidates(devices: int, processes: int = 1) -> list[int]:
    """Sampler device counts worth a search on ``devices``: an eighth, a quarter, a half and three quarters of
    them (a handful of searches, not D - 1), each a multiple of ``processes`` (every process gives the sampler
    as many of its own devices) leaving every process a learner device."""
    per_process = devices // processes
    out = set()
    for num, den in ((1, 8), (1, 4), (1, 2), (3, 4)):
        if devices * num % den == 0:
            s = devices * num // den
            if s % processes == 0 and 0 < s // processes < per_process:
                out.add(s)
    return sorted(out)


@dataclasses.dataclass
class SplitTrial:
    sampler_devices: int  # 0: colocated (for comparison)
    fit: Fit | None  # None: the split cannot be laid out (``why``)
    time: StepTime | None  # predicted on the accelerator (None when nothing fits)
    why: str = ""


def fit_split(cfg, accel: str, devices=None, candidates: list[int] | None = None,
              log: Callable[[str], None] = print) -> tuple[SplitTrial | None, list[SplitTrial]]:  # fmt: skip
    """``fit`` colocated and at each sampler device count of ``candidates`` (default ``split_candidates``);
    returns the split with the lowest predicted step time among those that fit (None if none does) and
    every trial, colocated first."""
    from echorl_jax import config as config_lib

    everything, _ = run_devices(_with(cfg, mesh={"sampler_devices": 0}), devices)
    processes = len({d.process_index for d in everything})
    trials = []
    for s in [0, *sorted(set(candidates or split_candidates(len(everything), processes)) - {0})]:
        log(f"mesh.sampler_devices={s}" + (" (colocated)" if not s else f": sampler mesh of {s}, learner mesh of "
                                                                        f"{len(everything) - s} devices"))  # fmt: skip
        try:
            c = _with(cfg, mesh={"sampler_devices": s})
            config_lib.validate(c)  # the combinations a split rules out (config.py)
            found = fit(c, accel, devices, log=lambda m: log("  " + m))
        except (config_lib.ConfigError, ValueError) as e:  # a mesh or batch the split cannot lay out
            trials.append(SplitTrial(s, None, None, str(e).splitlines()[0]))
            log(f"  cannot be laid out: {trials[-1].why}")
            continue
        time = found.plan.step_time(accel) if found.plan is not None else None
        trials.append(SplitTrial(s, found, time, found.why))
    splits = [t for t in trials if t.sampler_devices and t.time is not None]
    return (min(splits, key=lambda t: t.time.total) if splits else None), trials


def override_args(overrides: dict) -> str:
    def value(k, v):
        return f"{v / GB:g}e9" if k == "sampling.kv_cache_memory" else v

    return " ".join(f"--config.{k}={value(k, v)}" for k, v in overrides.items())
