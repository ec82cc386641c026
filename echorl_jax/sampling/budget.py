"""The sampler's memory plan: decode layout (``sampling/layout.py``) and decode slots from a KV budget.

``sampling.kv_cache_memory`` is a budget for the KV cache alone, per device, in the spirit of
vLLM's ``gpu_memory_utilization``: a fraction of the device's memory (``0 < x < 1``, of
``device.memory_stats()["bytes_limit"]``) or bytes (``x >= 1``). Unlike vLLM's setting it does not
cover the weights: the parameters, optimizer state and decode copy stay resident beside the cache
(``python -m echorl_jax.plan`` prints each). The decode rows are then as many whole rows per
decode group as fit the budget, times the number of groups (so a multiple of the decode batch
divisor); when they reach N·G the sampler decodes one row per rollout, otherwise it refills
slots (``sampling/decode.py``). A budget that holds no row is an error naming the row's size.

``sampling.slots`` and ``sampling.kv_cache_memory`` are exclusive (config validation refuses
both): slots fixes the rows, the budget chooses them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from echorl_jax.sampling.config import SamplingConfig
from echorl_jax.sampling.decode import response_columns, round_up
from echorl_jax.sampling.layout import DecodeLayout, auto_tensor_parallel, copy_bytes_per_device, decode_mesh


def device_memory(mesh=None) -> int | None:
    """``bytes_limit`` of the mesh's first device (or the default device), if the platform reports it."""
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 -- some backends raise instead of returning None
        stats = None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def budget_bytes(value: float, memory: int | None) -> int:
    """``sampling.kv_cache_memory`` in bytes per device."""
    if value >= 1:
        return int(value)
    if memory is None:
        raise ValueError(
            f"sampling.kv_cache_memory={value} is a fraction of the device's memory, which this platform "
            f"({jax.default_backend()}) does not report; give the budget in bytes (e.g. "
            "sampling.kv_cache_memory=20e9), or plan for an accelerator with python -m echorl_jax.plan --fit")
    return int(value * memory)


def kv_row_bytes(mcfg, tensor_parallel: int, prompt_len: int, t_max: int, block: int) -> int:
    """KV-cache bytes one decode row takes on each device of its group: 2 (k, v) · layers · kv heads
    (split over the group when it divides them, as the logical-axis rules do) · head dim ·
    (P + response columns) · dtype bytes."""
    shards = tensor_parallel if mcfg.num_kv_heads % tensor_parallel == 0 else 1
    cols = prompt_len + response_columns(t_max, block)
    itemsize = jnp.dtype(mcfg.compute_dtype).itemsize
    return 2 * mcfg.num_layers * (mcfg.num_kv_heads // shards) * mcfg.dim_per_head * cols * itemsize


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How one sampler decodes: its weights' layout and its decode rows."""

    layout: DecodeLayout
    slots: int  # the effective sampling.slots: rows with slot refill (0 or >= N·G: one row per rollout)
    budget: int  # KV-cache budget per device in bytes (0: none)
    kv_row_bytes: int  # one decode row's KV cache on each device of its group
    copy_bytes: int  # the decode copy on each device (0 when the parameters are used as they are)

    def rows(self, rollouts: int) -> tuple[int, bool]:
        """``(decode rows, refill)`` for ``rollouts`` = N·G."""
        return rows_for(self.slots, rollouts, self.layout.groups)

    def kv_bytes(self, rollouts: int) -> int:
        """The KV cache on each device for ``rollouts``."""
        return self.rows(rollouts)[0] // self.layout.groups * self.kv_row_bytes

    def describe(self, rollouts: int, name: str = "sampler") -> str:
        rows, refill = self.rows(rollouts)
        how = f"{rows} slots with refill" if refill else f"{rows} rows, one per rollout"
        source = (f"sampling.kv_cache_memory budget {self.budget / 1e9:.2f} GB per device" if self.budget else
                  f"sampling.slots={self.slots}" if self.slots else "no budget")  # fmt: skip
        return (f"{name}: {rollouts} rollouts decode in {how} ({source}); KV cache {self.kv_bytes(rollouts) / 1e9:.2f} "
                f"GB per device ({self.kv_row_bytes / 1e6:.1f} MB per row); "
                f"{self.layout.describe_bytes(self.copy_bytes)}")  # fmt: skip

    def copy(self, state):
        """The decode copy of ``state`` (``layout.DecodeWeights``)."""
        return self.layout.copy(state)


def choose_layout(cfg: SamplingConfig, mcfg, state, mesh, memory: int | None = None, devices=None) -> DecodeLayout:
    """The decode layout of ``state`` (the model's parameters, real or abstract) on ``mesh``:
    ``sampling.decode_tensor_parallel``, or auto (``layout.auto_tensor_parallel``) for 0.
    ``memory``: the device's memory in bytes (default: what the device reports). ``devices``: a sampler
    mesh of its own (``mesh.sampler_devices``); tensor parallelism then divides both sides' device counts."""
    where = mesh if devices is None or mesh is None else decode_mesh(mesh, 1, devices)
    memory = memory if memory is not None else device_memory(where)
    count = 1 if where is None else where.devices.size
    tp = cfg.decode_tensor_parallel or auto_tensor_parallel(state, where, mcfg.compute_dtype, memory)
    if count % tp:
        raise ValueError(f"sampling.decode_tensor_parallel={tp} must divide the number of "
                         f"{'sampler ' if devices is not None else ''}devices ({count})")
    if devices is not None and mesh is not None and mesh.devices.size % tp:
        raise ValueError(f"sampling.decode_tensor_parallel={tp} must divide the learner's device count too "
                         f"({mesh.devices.size}): the push slices the weights on the learner's devices first")
    return DecodeLayout(mesh, tp, mcfg.compute_dtype, devices)


def rows_for(slots: int, rollouts: int, divisor: int) -> tuple[int, bool]:
    """``(decode rows, refill)``: ``slots`` rounded to the batch ``divisor`` when below N·G
    (``rollouts``, also rounded), else one row per rollout."""
    plain = round_up(rollouts, divisor)
    slots = round_up(slots, divisor)
    return (slots, True) if 0 < slots < plain else (plain, False)


def plan_decode(cfg: SamplingConfig, mcfg, state, layout: DecodeLayout, *, prompt_len: int, block: int,
                memory: int | None = None) -> DecodePlan:  # fmt: skip
    """The decode rows for prompts of width ``prompt_len`` (from ``sampling.slots`` or the KV budget)
    and the per-device bytes of the plan. Errors name the config key."""
    row = kv_row_bytes(mcfg, layout.tensor_parallel, prompt_len, cfg.max_new_tokens, block)
    slots, budget = cfg.slots, 0
    if cfg.kv_cache_memory:
        budget = budget_bytes(cfg.kv_cache_memory, memory if memory is not None else device_memory(layout.mesh))
        if budget < row:
            raise ValueError(
                f"sampling.kv_cache_memory={cfg.kv_cache_memory:g} ({budget / 1e9:.3f} GB per device) holds no decode "
                f"row: one row of P {prompt_len} + T {cfg.max_new_tokens} tokens takes {row / 1e9:.3f} GB per device; "
                "raise the budget, shorten data.max_prompt_len / sampling.max_new_tokens, or use more devices or "
                "sampling.decode_tensor_parallel")  # fmt: skip
        slots = budget // row * layout.groups
    copy = copy_bytes_per_device(state, layout.mesh, mcfg.compute_dtype) if layout.needs_copy(state) else 0
    return DecodePlan(layout, slots, budget, row, copy)
