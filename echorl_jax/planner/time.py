"""Predicted step time: a roofline floor per phase, colocated or disaggregated. A prediction, not a measurement.

Each phase's work per device is a few *parts*: ``(count, flops, bytes)`` of a program (or of one decode
step) run ``count`` times per RL step. A part takes at least ``max(flops / peak flops, bytes / HBM
bandwidth)`` (the roofline floor of its compute and memory traffic); a phase the sum of its parts. Then

* colocated: ``step = sample + learn`` (every device does both, in turn);
* disaggregated, streaming (``rl.max_staleness >= 1``): ``step = max(sample on S devices, learn on D - S)
  + push``: the sampler decodes step s + 1 while the learner updates on step s, and the weight push
  (each sampler device receives its slice of the decode copy over the interconnect) waits for both;
* disaggregated, synchronous: ``step = sample + learn + push`` (the learner needs the rollouts of this
  step, the sampler the weights of the last update: they take turns).

Where the work comes from (memory.py): a compiled program's flops with every loop counted as often as it
runs (cost.py; a packed train step as if every micro-batch were full) and as its bytes every buffer it
holds touched once (a floor: XLA:CPU's own byte counts are not usable, cost.py says why); the decode
steps counted from the decode layout (``decode_parts``) with every rollout running to
``sampling.max_new_tokens``, an upper bound on decode work. Per RL step: one round of rollouts
(``prompts_per_step`` x G - k; DAPO's extra rounds are not counted), ``rl.minibatches x rl.epochs`` train
steps, the log-prob pass when the run makes it, the echo diagnostic 1 / ``train.echo_grad_norm_every``
times; the held-out sampler (every ``train.eval_every`` steps) is left out.

Not modelled: collectives inside a mesh (FSDP all-gathers, tensor-parallel all-reduces), host work
(rewards, data), kernel launch and loop overheads, and lower utilisation than peak. A measured step is
slower than this floor; the floors compare layouts, they do not predict a wall clock.

Pure functions on numbers; the planner (memory.py) measures the work, ``PEAKS`` holds the accelerators'
figures.
"""

from __future__ import annotations

from typing import NamedTuple


class Peak(NamedTuple):
    """An accelerator's peak figures, per chip."""

    flops: float  # dense bf16 FLOP/s
    hbm: float  # memory bandwidth, bytes/s
    link: float  # bytes/s one chip receives a weight push at (interconnect, one direction)
    link_name: str = ""


# Peak figures per chip for the predicted step time (planner/time.py), from the vendors' pages: NVIDIA "H100
# Tensor Core GPU" datasheet (SXM: BF16 1,979 TFLOPS *with sparsity*, i.e. 989 dense; HBM3 3.35 TB/s;
# NVLink 900 GB/s), "H200 Tensor Core GPU" (989 dense; 4.8 TB/s; NVLink 900 GB/s), "A100 Tensor Core
# GPU" (80GB SXM: 312 dense; 2,039 GB/s; NVLink 600 GB/s); Google Cloud TPU docs "TPU v5e" (197 TFLOPs;
# 819 GBps; bidirectional ICI 400 GBps per chip over 4 ports), "TPU v5p" (459; 2,765 GBps; 1,200 GBps over
# 6 ports), "TPU v6e" (918; 1,638 GBps; 800 GBps over 4 ports). The push link: what one chip receives at,
# one direction: half the NVLink total (NVSwitch: any pair at full rate); on TPU one ICI port (a sampler
# chip takes its slice from one paired learner chip; a path of several hops or ports is not assumed).
PEAKS = {
    "h100": Peak(989e12, 3.35e12, 450e9, "NVLink 4, 450 GB/s per direction"),
    "a100": Peak(312e12, 2.039e12, 300e9, "NVLink 3, 300 GB/s per direction"),
    "h200": Peak(989e12, 4.8e12, 450e9, "NVLink 4, 450 GB/s per direction"),
    "v5e": Peak(197e12, 819e9, 50e9, "one ICI port, 50 GB/s per direction"),
    "v5p": Peak(459e12, 2.765e12, 100e9, "one ICI port, 100 GB/s per direction"),
    "v6e": Peak(918e12, 1.638e12, 100e9, "one ICI port, 100 GB/s per direction"),
}


class Part(NamedTuple):
    """A program (or one decode step) run ``count`` times per RL step, per device."""

    count: float
    flops: float
    bytes: float


class Work(NamedTuple):
    """One phase's work per device and per RL step, on the ``side`` that runs it."""

    name: str
    side: str  # "learner" or "sampler"
    parts: tuple[Part, ...]
    what: str = ""


class StepTime(NamedTuple):
    sample: float  # seconds per RL step on the sampler's devices (all devices when colocated)
    learn: float  # on the learner's devices
    push: float  # the weight push (0 colocated)
    total: float
    layout: str  # "colocated", "disaggregated, overlapped", "disaggregated, in turn"


def roofline(flops: float, bytes_: float, peak: Peak) -> float:
    """Seconds at least: compute at peak or memory traffic at full bandwidth, whichever is longer."""
    return max(flops / peak.flops, bytes_ / peak.hbm)


def work_time(work: Work, peak: Peak) -> float:
    return sum(p.count * roofline(p.flops, p.bytes, peak) for p in work.parts)


def push_time(bytes_per_device: float, peak: Peak) -> float:
    """Every sampler device receives its slice at once, each over its own link."""
    return bytes_per_device / peak.link


def step_time(works: tuple[Work, ...], peak: Peak, *, split: bool, overlap: bool, push_bytes: float = 0.0) -> StepTime:
    sample = sum(work_time(w, peak) for w in works if w.side == "sampler")
    learn = sum(work_time(w, peak) for w in works if w.side == "learner")
    if not split:
        return StepTime(sample, learn, 0.0, sample + learn, "colocated")
    push = push_time(push_bytes, peak)
    if overlap:
        return StepTime(sample, learn, push, max(sample, learn) + push, "disaggregated, overlapped")
    return StepTime(sample, learn, push, sample + learn + push, "disaggregated, in turn")


def decode_schedule(t_max: int, block: int, prompt_len: int, buckets: list[int], refill: bool,
                    waves: int = 1) -> list[tuple[int, int]]:  # fmt: skip
    """``(iterations, key columns read)`` of the sampler's decode loops (sampling/decode.py: key blocks of
    ``block`` columns, a loop per bucket of blocks in ``buckets``) when every rollout runs to ``t_max``
    tokens, an upper bound on decode work. One row per rollout: steps t = 1 .. T - 1 (token 0 comes from the
    prefill), step t reading the prompt and the smallest bucket holding t columns. Slot refill: ``waves`` =
    ceil(rollouts / slots) rounds in lock step, T iterations each, iteration j reading the bucket that holds
    j + 1 columns (the ring's live window)."""
    counts: dict[int, int] = {}
    for t in range(0, t_max) if refill else range(1, t_max):
        need = t // block + 1 if refill else -(-t // block)
        cols = prompt_len + next(b for b in buckets if b >= need) * block
        counts[cols] = counts.get(cols, 0) + (waves if refill else 1)
    return [(n, cols) for cols, n in sorted(counts.items())]


def decode_parts(steps: list[tuple[int, int]], rows: int, weight_bytes: float, weight_elems: float,
                 kv_bytes_per_column: float, attn_flops_per_column: float) -> tuple[Part, ...]:  # fmt: skip
    """One decode step per device, counted from the decode layout (the sampler's compiled while loops have
    no trip count XLA knows, and XLA:CPU's bytes would be its f32 upcasts of the bf16 weights):

    * ``steps``: ``(iterations, key columns read)`` per distinct extent;
    * ``rows``: the decode rows of one tensor-parallel group (every device of the group runs them all);
    * bytes: the decode weights on the device (``weight_bytes``: every weight read once per step) + the KV
      cache read, ``rows x columns x kv_bytes_per_column``;
    * flops: ``2 x weight_elems x rows`` (every weight multiplies every row once) + attention,
      ``rows x columns x attn_flops_per_column``."""
    return tuple(Part(n, 2 * weight_elems * rows + rows * cols * attn_flops_per_column,
                      weight_bytes + rows * cols * kv_bytes_per_column) for n, cols in steps if n)  # fmt: skip


def seconds(x: float) -> str:
    if x >= 1:
        return f"{x:.1f} s"
    return f"{x * 1e3:.1f} ms" if x >= 1e-3 else f"{x * 1e6:.0f} us"
