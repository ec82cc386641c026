"""Packed learner batches: whole sequences placed in fixed-length rows, no padding FLOPs.

The sampler's rows ``[B, S = P + T]`` are ``left pad | prompt | response | right pad``; RL
response lengths are long-tailed, so most of a padded row is padding. The learner instead
packs the rows' real tokens (a contiguous run each) into rows of ``L = P + T`` tokens,
several sequences per row, and computes on those (DESIGN.md §3, docs/training.md):

* **Host** (``plan_rows``, numpy, O(B) out): first-fit-decreasing places each sequence
  whole in a packed row (at most ``attention.MAX_SEGMENTS`` per row), the rows are spread
  evenly over the devices of the batch axes (fewest rows, then fewest tokens first), and each
  device's rows form micro-batches of ``k`` rows. Only the destination of each sequence --
  one int per rollout row -- goes to the devices.
* **Device** (``micro_batch_index``, ``gather``): inside the jitted step, each micro-batch's
  index arrays are built from those destinations, and every ``[B, w]`` field of the batch is
  gathered into the packed ``[R, L]`` layout with ``jnp.take`` (any field: a ``[B, w]`` array
  covers the last ``w`` columns of the ``[B, S]`` row, so ``[B, S]`` tokens and ``[B, T]``
  response fields are one rule). Packed rows carry segment ids (``1, 2, ...`` per row, 0 for
  padding) and positions restarting at 0 per sequence (RoPE).
* **Static shapes**: a step always scans ``C`` micro-batches of ``R = k · devices`` rows, ``C``
  the count that holds every sequence at full length (``make_spec``); micro-batches left empty
  are skipped with ``lax.cond``. One compiled program per pass, whatever the lengths.

Shape letters: b rollout rows (B), s their columns (S), c micro-batches (C), r packed rows of
one micro-batch (R), l packed columns (L).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from echorl_jax import sharding
from echorl_jax.models.attention import MAX_SEGMENTS
from echorl_jax.rl.segments import Segments


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """The fixed shapes of one packed pass over ``num_rows`` rollout rows."""

    num_rows: int  # B: rollout rows placed per call (a mini-batch, or the whole rollout batch)
    source_len: int  # S = P + T: columns of the rollout rows
    response_len: int  # T: the unpacked response length (Dr.GRPO's divisor)
    row_len: int  # L: columns of a packed row
    rows_per_device: int  # k: packed rows per device per micro-batch
    devices: int  # size of the mesh's batch axes
    num_micro_batches: int  # C: micro-batches scanned per call; empty ones are skipped
    sharding: Any = None  # NamedSharding of an [R, L] array (rows over the batch axes); None = unconstrained

    @property
    def rows_per_micro_batch(self) -> int:  # R
        return self.rows_per_device * self.devices

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.rows_per_micro_batch * self.row_len

    def layout(self, index: "PackedIndex") -> Segments:
        """The losses' view of one packed micro-batch (rl/segments.py)."""
        return Segments(index.seq_bt, self.num_rows, self.response_len)


def make_spec(num_rows: int, source_len: int, response_len: int, rows_per_device: int, mesh=None,
              devices: int | None = None) -> PackSpec:  # fmt: skip
    """Packed rows of ``L = source_len`` tokens, ``rows_per_device`` of them per device per micro-batch
    (at most one per rollout row of the device), and enough micro-batches for every row at full length.
    ``mesh`` (or ``devices``) gives the batch axes; with a mesh the packed arrays are constrained to rows
    over them."""
    devices = sharding.batch_divisor(mesh) if mesh is not None else (devices or 1)
    if num_rows % devices:
        raise ValueError(f"packing: {num_rows} rows are not a multiple of the mesh's batch axes size {devices}")
    if rows_per_device < 1:
        raise ValueError(f"rl.pack_rows_per_micro_batch={rows_per_device}: packing needs at least one row")
    per_device = num_rows // devices
    k = min(rows_per_device, per_device)
    sh = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES, None)) if mesh is not None else None
    return PackSpec(num_rows=num_rows, source_len=source_len, response_len=response_len, row_len=source_len,
                    rows_per_device=k, devices=devices, num_micro_batches=-(-per_device // k), sharding=sh)  # fmt: skip


# ----------------------------------------------------------------------------- host: placement


def skipped_dest(spec: PackSpec) -> int:
    """The ``dest_b`` of a row left out of every micro-batch: one past the packed layout ``[C, R, L]``."""
    return spec.num_micro_batches * spec.tokens_per_micro_batch


def plan_rows(length_b: np.ndarray, spec: PackSpec, max_segments: int = MAX_SEGMENTS,
              keep_b: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """``dest_b`` int32 ``[B]``: where rollout row ``b``'s real tokens start in the flattened packed
    layout ``[C, R, L]`` (``(c · R + r) · L + offset``). Rows with ``keep_b`` false are placed nowhere
    (``skipped_dest``): no micro-batch computes them (the train step's rows that carry no gradient).

    First-fit-decreasing into rows of ``L`` tokens and at most ``max_segments`` sequences; the rows,
    largest first, go to the device with the fewest tokens among those holding fewer than
    ``ceil(rows / devices)``; device ``d``'s ``j``-th row is row ``d · k + j % k`` of micro-batch
    ``j // k``. Fewer rows than sequences, spread evenly, so ``C`` micro-batches always suffice.
    """
    length_b = np.asarray(length_b, np.int64)
    if length_b.shape != (spec.num_rows,):
        raise ValueError(f"packing: {length_b.shape[0]} row lengths for a spec of {spec.num_rows} rows")
    if keep_b is not None:
        keep_b = np.asarray(keep_b, bool)
        dest = np.full(spec.num_rows, skipped_dest(spec), np.int64)
        if keep_b.any():
            dest[keep_b] = _place(length_b[keep_b], spec, max_segments)
        return dest.astype(np.int32)
    return _place(length_b, spec, max_segments).astype(np.int32)


def _place(length_b: np.ndarray, spec: PackSpec, max_segments: int) -> np.ndarray:
    L, k, D = spec.row_len, spec.rows_per_device, spec.devices
    if length_b.size and (length_b.min() < 1 or length_b.max() > L):
        raise ValueError(f"packing: row lengths must be in [1, {L}]; got {length_b.min()}..{length_b.max()}")
    free = np.empty(len(length_b), np.int64)  # tokens left per packed row
    count = np.empty(len(length_b), np.int64)  # sequences per packed row
    row_of, offset = np.empty(len(length_b), np.int64), np.empty(len(length_b), np.int64)
    rows = 0
    for b in np.argsort(-length_b, kind="stable"):
        n = length_b[b]
        fits = (free[:rows] >= n) & (count[:rows] < max_segments)
        j = int(np.argmax(fits)) if rows and fits.any() else rows
        if j == rows:
            free[j], count[j], rows = L, 0, rows + 1
        row_of[b], offset[b] = j, L - free[j]
        free[j] -= n
        count[j] += 1
    quota = -(-rows // D)
    tokens_d, rows_d = np.zeros(D, np.int64), np.zeros(D, np.int64)
    flat_row = np.empty(rows, np.int64)
    for j in np.argsort(free[:rows], kind="stable"):  # fullest rows first
        d = int(np.argmin(np.where(rows_d < quota, tokens_d, np.iinfo(np.int64).max)))
        c, slot = divmod(int(rows_d[d]), k)
        flat_row[j] = c * spec.rows_per_micro_batch + d * k + slot
        tokens_d[d] += L - free[j]
        rows_d[d] += 1
    if rows and quota > spec.num_micro_batches * k:  # cannot happen: rows <= B
        raise AssertionError(f"packing: {quota} rows per device exceed {spec.num_micro_batches} x {k}")
    return flat_row[row_of] * L + offset


def micro_batches_used(dest_b: np.ndarray, spec: PackSpec) -> int:
    """How many of the ``C`` micro-batches hold a sequence (the rest are skipped)."""
    dest_b = np.asarray(dest_b)
    return int(np.unique(dest_b[dest_b < skipped_dest(spec)] // spec.tokens_per_micro_batch).size)


def plan_stats(dest_b: np.ndarray, length_b: np.ndarray, spec: PackSpec) -> dict[str, float]:
    """Train metrics of one plan: micro-batches computed (of ``C``), and the real tokens' share of the
    tokens those micro-batches compute (``packing/fill``; a padded step's is sum(lengths) / (B · S))."""
    used = micro_batches_used(dest_b, spec)
    placed = np.asarray(dest_b) < skipped_dest(spec)
    real = float(np.sum(np.asarray(length_b)[placed]))
    return {"packing/micro_batches": float(used), "packing/skipped_rows": float(np.sum(~placed)),
            "packing/fill": real / max(used * spec.tokens_per_micro_batch, 1)}  # fmt: skip


def put_plan(dest_b: np.ndarray, mesh) -> jax.Array:
    """The host plan, replicated on ``mesh`` (every process computes the same plan)."""
    rep = sharding.replicated(mesh)
    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(rep, np.asarray(dest_b, np.int32))
    return jax.device_put(np.asarray(dest_b, np.int32), rep)


def abstract_plan(num_rows: int, mesh) -> jax.ShapeDtypeStruct:
    """The plan's abstract value (ahead-of-time compiles, plan.py)."""
    return jax.ShapeDtypeStruct((num_rows,), jnp.int32, sharding=sharding.replicated(mesh))


# ----------------------------------------------------------------------------- device: index and gather


class Placement(NamedTuple):
    """Where each rollout row's real tokens are (``[B]`` int32 each, replicated)."""

    dest_b: jax.Array  # start in the flattened packed layout (plan_rows)
    start_b: jax.Array  # first real column of the rollout row (its left padding)
    length_b: jax.Array  # real tokens of the rollout row


def placement(dest_b, valid_bs) -> Placement:
    valid_bs = jnp.asarray(valid_bs, bool)
    return Placement(jnp.asarray(dest_b, jnp.int32), jnp.argmax(valid_bs, axis=1).astype(jnp.int32),
                     valid_bs.sum(axis=1, dtype=jnp.int32))  # fmt: skip


class PackedIndex(NamedTuple):
    """One packed micro-batch: for every packed token ``(r, l)``, ``[R, L]`` int32 each."""

    seq_bt: jax.Array  # its rollout row; B (out of range) on padding
    col_bt: jax.Array  # its column in that row's [S] layout; 0 on padding
    segment_bt: jax.Array  # 1, 2, ... per sequence of the packed row; 0 on padding
    position_bt: jax.Array  # 0, 1, ... inside its sequence (RoPE); 0 on padding


def _constrain(x, spec: PackSpec):
    return x if spec.sharding is None else jax.lax.with_sharding_constraint(x, spec.sharding)


def micro_batch_index(place: Placement, c, spec: PackSpec) -> PackedIndex:
    """The index arrays of micro-batch ``c`` (traced), from the rows' placements."""
    R, L, B = spec.rows_per_micro_batch, spec.row_len, spec.num_rows
    local = place.dest_b - c * (R * L)
    local = jnp.where((local >= 0) & (local < R * L), local, R * L)  # other micro-batches: dropped
    starts = jnp.zeros(R * L, jnp.int32).at[local].set(jnp.arange(1, B + 1, dtype=jnp.int32), mode="drop")
    starts = _constrain(starts.reshape(R, L), spec)  # b + 1 where row b starts, else 0
    cols = jnp.arange(L, dtype=jnp.int32)[None, :]
    begin = jax.lax.cummax(jnp.where(starts > 0, cols, -1), axis=1)  # the latest start at or before l
    owner = jnp.take_along_axis(starts, jnp.maximum(begin, 0), axis=1) - 1  # -1 before any start
    pos = cols - begin
    safe = jnp.maximum(owner, 0)
    real = (owner >= 0) & (pos < place.length_b[safe])
    return PackedIndex(
        seq_bt=jnp.where(real, owner, B),
        col_bt=jnp.where(real, place.start_b[safe] + pos, 0),
        segment_bt=jnp.where(real, jnp.cumsum(starts > 0, axis=1, dtype=jnp.int32), 0),
        position_bt=jnp.where(real, pos, 0),
    )


def gather(batch, index: PackedIndex, spec: PackSpec):
    """Every ``[B, w]`` leaf of ``batch`` (any pytree; ``None`` stays) in the packed ``[R, L]`` layout,
    zero (False) on padding. A ``[B, w]`` leaf covers the last ``w`` of the row's ``S`` columns."""
    B, S = spec.num_rows, spec.source_len

    def one(path, x):
        if x is None:
            return None
        w = x.shape[1] if x.ndim == 2 else -1
        if x.ndim != 2 or x.shape[0] != B or w > S:
            raise ValueError(f"packing: batch field {jax.tree_util.keystr(path)} has shape {x.shape}; packed fields "
                             f"are [B={B}, w <= S={S}] (the last w columns of each row)")  # fmt: skip
        t = index.col_bt - (S - w)
        present = (index.seq_bt < B) & (t >= 0)
        flat = jnp.where(present, index.seq_bt * w + t, B * w)
        out = jnp.take(x.reshape(-1), flat, mode="fill", fill_value=0)
        return _constrain(out, spec)

    return jax.tree_util.tree_map_with_path(one, batch, is_leaf=lambda x: x is None)


def has_sequences(place: Placement, spec: PackSpec) -> jax.Array:
    """bool ``[C]``: micro-batch ``c`` holds at least one sequence."""
    c_b = place.dest_b // spec.tokens_per_micro_batch
    return jnp.zeros(spec.num_micro_batches, jnp.int32).at[c_b].add(1, mode="drop") > 0


def scan_packed(fn: Callable, carry, batch, place: Placement, spec: PackSpec):
    """``carry = fn(carry, packed_batch, index)`` over the micro-batches that hold a sequence."""
    used = has_sequences(place, spec)

    def step(carry, c):
        index = micro_batch_index(place, c, spec)
        mb = gather(batch, index, spec)
        return jax.lax.cond(used[c], lambda cr: fn(cr, mb, index), lambda cr: cr, carry), None

    carry, _ = jax.lax.scan(step, carry, jnp.arange(spec.num_micro_batches))
    return carry


def map_packed(fn: Callable, batch, place: Placement, spec: PackSpec):
    """``fn(packed_batch, index)`` for every micro-batch, stacked ``[C, ...]``; zeros for empty ones."""
    used = has_sequences(place, spec)

    def one(c):
        index = micro_batch_index(place, c, spec)
        mb = gather(batch, index, spec)
        out_shape = jax.eval_shape(fn, mb, index)
        zeros = lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shape)  # noqa: E731
        return jax.lax.cond(used[c], lambda: fn(mb, index), zeros)

    return jax.lax.map(one, jnp.arange(spec.num_micro_batches))


def unpack(x_crl: jax.Array, place: Placement, width: int, spec: PackSpec) -> jax.Array:
    """``[C, R, L]`` per-token values back to the rollout rows' last ``width`` columns: ``[B, width]``,
    zero where a row has no real token."""
    cols = spec.source_len - width + jnp.arange(width, dtype=jnp.int32)
    pos = cols[None, :] - place.start_b[:, None]
    real = (pos >= 0) & (pos < place.length_b[:, None])
    flat = jnp.where(real, place.dest_b[:, None] + pos, 0)
    return jnp.where(real, jnp.take(x_crl.reshape(-1), flat), 0).astype(x_crl.dtype)


def spec_summary(spec: PackSpec) -> str:
    return (f"packed rows of {spec.row_len} tokens, {spec.rows_per_device} per device per micro-batch, "
            f"up to {spec.num_micro_batches} micro-batches for {spec.num_rows} rows")  # fmt: skip
