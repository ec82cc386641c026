"""The weights the sampler decodes with: a copy in the compute dtype, laid out for decoding.

Training keeps fp32 masters and Adam's moments sharded over the training mesh (e.g. FSDP over 8
devices). A sampler compiled on those parameters all-gathers them once before its decode loop, so
every device held a full fp32 copy of the model while sampling (30.5 GB for a 7B model). Instead,
once per RL step (and once per evaluation), ``DecodeLayout.copy`` makes the decode copy: one
jitted program that casts every parameter to ``model.compute_dtype`` where it lies and reshards it
(explicit ``out_shardings``) onto the *decode mesh*: the same devices, in the same order, as
``(data = D / tp groups, fsdp = 1, tensor = tp)``. The logical-axis rules then put heads, kv
heads, the MLP and the vocabulary over a group of ``tp`` devices and replicate the copy across
groups; decode rows (and the KV cache) are sharded over the groups. The masters and the optimizer
state stay where they are; the trainer drops the copy after sampling.

``sampling.decode_tensor_parallel`` sets ``tp`` (it must divide the device count); 0 (auto) picks
the smallest divisor of the device count whose decode copy takes at most 1/8 of a device's memory
(``DECODE_COPY_SHARE``): that leaves the KV cache and the resident training state the rest, and it
keeps tensor parallelism -- two all-reduces per layer and decode step -- as small as memory
allows. For Qwen2.5-7B in bf16 (15.2 GB) on 80 GB devices that is tp 2, the reference's (LUFFY /
verl) vLLM setting; 1.5B models get tp 1 on 80 GB and tp 2 on 16 GB (TPU v5e). Where the device
does not report its memory (CPU) auto is 1.

When the copy would equal the parameters (same dtype, same shardings: fp32 on one device, or a
data-parallel mesh with tp 1) no copy is made.

A state may be part of the parameters (LoRA copies its adapters every step and its frozen base once
per run, trainer/setup.py): one copy program is built per state structure.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from echorl_jax.sharding import MESH_AXES, state_shardings

DECODE_COPY_SHARE = 8  # auto tensor parallelism: the decode copy takes at most 1/8 of a device's memory


class DecodeWeights(NamedTuple):
    """Parameters already in the decode layout (``DecodeLayout.copy``); the sampler uses them as they are.
    ``version``: with a sampler mesh of its own, the policy version the weights were pushed for, an int32
    scalar that made the trip with them (``DecodeLayout.check_landed``); else None."""

    params: Any
    version: Any = None


class StaleWeightsError(RuntimeError):
    """The sampler's weights are not the version the learner pushed: a push did not land."""


def decode_mesh(mesh: Mesh | None, tensor_parallel: int, devices=None) -> Mesh | None:
    """``devices`` (default: ``mesh``'s), in their order, as (data = D / tp, fsdp = 1, tensor = tp)."""
    if mesh is None:
        return None
    devices = np.asarray(mesh.devices if devices is None else list(devices), dtype=object).reshape(-1)
    return Mesh(devices.reshape(len(devices) // tensor_parallel, 1, tensor_parallel), MESH_AXES)


def _pair_devices(mirror: Mesh, decode: Mesh) -> dict:
    """Sampler device -> the learner device it receives its weight slice from: the same tensor position, a
    mirror group of the same process (the k-th sampler group of a process reads that process's
    k mod n-th learner group). A tensor-parallel group that spans processes on either side is an error."""

    def groups(mesh):
        out: dict[int, list[np.ndarray]] = {}
        for row in np.asarray(mesh.devices)[:, 0, :]:
            procs = {d.process_index for d in row}
            if len(procs) != 1:
                raise ValueError(f"sampling.decode_tensor_parallel={row.size}: a tensor-parallel group spans processes "
                                 f"{sorted(procs)}; it must divide every process's sampler and learner devices")
            out.setdefault(procs.pop(), []).append(row)
        return out

    learner, sampler = groups(mirror), groups(decode)
    pairs = {}
    for proc, rows in sampler.items():
        if proc not in learner:
            raise ValueError(f"process {proc} has sampler devices but no learner device")
        for k, row in enumerate(rows):
            src = learner[proc][k % len(learner[proc])]
            pairs.update(zip(row.tolist(), src.tolist()))
    return pairs


def _floating(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _cast_dtype(x, dtype):
    return jnp.dtype(dtype) if _floating(x.dtype) else x.dtype


def copy_bytes_per_device(state, mesh: Mesh | None, dtype) -> int:
    """Bytes one device holds of the decode copy of ``state`` (real or abstract) on ``mesh``."""
    leaves = jax.tree.leaves(state)
    if mesh is None:
        return sum(math.prod(x.shape) * _cast_dtype(x, dtype).itemsize for x in leaves)
    shards = jax.tree.leaves(state_shardings(state, mesh))
    return sum(math.prod(s.shard_shape(x.shape)) * _cast_dtype(x, dtype).itemsize for x, s in zip(leaves, shards))


def auto_tensor_parallel(state, mesh: Mesh | None, dtype, device_memory: int | None) -> int:
    """The smallest divisor of the device count whose decode copy fits 1/``DECODE_COPY_SHARE`` of
    ``device_memory`` (all devices if none does); 1 without a mesh or a known memory size."""
    if mesh is None or device_memory is None:
        return 1
    d = mesh.devices.size
    for tp in (t for t in range(1, d + 1) if d % t == 0):
        if copy_bytes_per_device(state, decode_mesh(mesh, tp), dtype) * DECODE_COPY_SHARE <= device_memory:
            return tp
    return d


def _is_stacked(var) -> bool:
    """Whether a parameter (an nnx Variable) is stacked over layers on its leading axis."""
    axes = var.get_metadata().get("logical_axes") if isinstance(var, nnx.Variable) else None
    return bool(axes) and axes[0] == "layers"


def _move(x, dtype, target: NamedSharding, layered: bool):
    """``x`` cast to ``dtype`` and placed as ``target``; a layer-stacked ``x`` one layer at a time.

    Each layer is gathered whole (replicated) and then sliced locally: between unrelated shardings
    that is what XLA does anyway ("involuntary full rematerialization"); said explicitly, the
    transient is one layer's slice in the compute dtype."""
    whole = NamedSharding(target.mesh, P())
    if not layered or x.shape[0] == 1:
        return x.astype(dtype)  # out_shardings place it (XLA gathers it whole, then slices)
    spec = tuple(target.spec) + (None,) * (x.ndim - len(target.spec))
    layer = NamedSharding(target.mesh, P(*spec[1:]))

    def one(i, out):
        y = jax.lax.with_sharding_constraint(jax.lax.dynamic_index_in_dim(x, i, keepdims=False).astype(dtype), whole)
        return jax.lax.dynamic_update_index_in_dim(out, jax.lax.with_sharding_constraint(y, layer), i, 0)

    out = jax.lax.with_sharding_constraint(jnp.zeros(x.shape, dtype), target)
    return jax.lax.fori_loop(0, x.shape[0], one, out)


class DecodeLayout:
    """Where and in which dtype the sampler's weights live; ``copy(params)`` makes them.

    ``devices``: a sampler mesh of its own (``mesh.sampler_devices``, disjoint from ``mesh``'s, the learner's).
    ``copy`` is then a *push*: the cast + reshard program runs on the learner's devices into a mirror of the
    decode layout (the learner's devices as (D_L / tp, 1, tp)), so each learner device holds exactly the slice
    some sampler device needs, and every sampler device then receives its slice from a learner device of its
    own process (``jax.device_put`` of one shard: a device-to-device copy, no host round trip, no gather).
    The policy version travels with the weights; ``check_landed`` compares it before decoding.
    """

    def __init__(self, mesh: Mesh | None, tensor_parallel: int, dtype, devices=None):
        self.train_mesh = mesh
        self.split = devices is not None and mesh is not None
        self.mesh = decode_mesh(mesh, tensor_parallel, devices if self.split else None)
        self.tensor_parallel = tensor_parallel
        self.dtype = jnp.dtype(dtype)
        self._jitted = {}  # the cast + reshard programs, one per state structure
        self.copies = 0  # how many copies were made (tests)
        self.pushed_bytes = 0  # split: bytes this process's sampler devices received in the last push
        self.mirror = decode_mesh(mesh, tensor_parallel) if self.split else None
        self.pairs = _pair_devices(self.mirror, self.mesh) if self.split else {}

    @property
    def groups(self) -> int:
        """Decode groups (each holds a whole copy): the decode mesh's batch divisor."""
        return 1 if self.mesh is None else self.mesh.devices.size // self.tensor_parallel

    def _target(self, state, mesh=None):
        return None if self.mesh is None else state_shardings(state, mesh or self.mesh)

    def is_decode_layout(self, state) -> bool:
        """Whether ``state`` (placed arrays) already has the decode dtype and shardings."""
        leaves = jax.tree.leaves(state)
        if not all(isinstance(x, jax.Array) and x.dtype == _cast_dtype(x, self.dtype) for x in leaves):
            return False
        if self.mesh is None:
            return all(len(x.sharding.device_set) == 1 for x in leaves)
        return all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, jax.tree.leaves(self._target(state))))

    def needs_copy(self, state) -> bool:
        """Whether the decode copy of ``state`` (real or abstract, placed on the training mesh by its
        logical axes) differs from it: another dtype or other shardings."""
        leaves = jax.tree.leaves(state)
        if any(x.dtype != _cast_dtype(x, self.dtype) for x in leaves):
            return True
        if self.mesh is None:
            return False
        here, there = (jax.tree.leaves(state_shardings(state, m)) for m in (self.train_mesh, self.mesh))
        return not all(a.is_equivalent_to(b, x.ndim) for x, a, b in zip(leaves, here, there))

    def _program(self, state):
        """The jitted cast + reshard, built once per state structure.

        Each parameter is cast where it lies, then moved. XLA moves a parameter between two
        unrelated shardings (FSDP over embed -> a tensor-parallel group) by gathering it whole
        first; layer-stacked parameters therefore move one layer at a time (a loop writing into
        the decode-sharded result), so the transient is one layer's slice, not the whole model.
        """
        structure = jax.tree.structure(state)
        if structure not in self._jitted:
            dtype, target = self.dtype, self._target(state, self.mirror)  # split: the learner's mirror of it
            targets = None if target is None else jax.tree.leaves(target)
            stacked = [_is_stacked(v) for v in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))]

            def cast(tree):
                leaves, treedef = jax.tree.flatten(tree)
                if targets is None:
                    return treedef.unflatten([x.astype(_cast_dtype(x, dtype)) for x in leaves])
                return treedef.unflatten([_move(x, _cast_dtype(x, dtype), t, layered)
                                          for x, t, layered in zip(leaves, targets, stacked)])  # fmt: skip

            self._jitted[structure] = jax.jit(cast, out_shardings=target)
        return self._jitted[structure]

    def copy(self, state, version: int | None = None) -> DecodeWeights:
        """The decode copy of ``state`` (an nnx State of the model's parameters, or a part of them, on any
        placement). Split: pushed to the sampler's devices with ``version`` (default 0) beside it."""
        if isinstance(state, DecodeWeights):
            return state
        if isinstance(state, nnx.Module):
            state = nnx.state(state)
        if self.is_decode_layout(state):
            return DecodeWeights(state)
        self.copies += 1
        copied = self._program(state)(state)
        if not self.split:
            return DecodeWeights(copied)
        tag = jax.device_put(np.int32(version or 0), NamedSharding(self.mirror, P()))
        targets = jax.tree.leaves(self._target(state))
        leaves, treedef = jax.tree.flatten(copied)
        self.pushed_bytes = 0
        moved = [self._transfer(x, t) for x, t in zip(leaves, targets)]
        return DecodeWeights(treedef.unflatten(moved), self._transfer(tag, NamedSharding(self.mesh, P())))

    def _transfer(self, x: jax.Array, target: NamedSharding) -> jax.Array:
        """``x`` (on the learner's mirror layout) as ``target`` on the sampler's devices: each sampler device
        gets its shard from its paired learner device (same process, same tensor slice)."""
        src = {sh.device: sh.data for sh in x.addressable_shards}
        index = x.sharding.devices_indices_map(x.shape)
        want = target.addressable_devices_indices_map(x.shape)
        arrays = []
        for d, idx in want.items():
            s = self.pairs[d]
            if index[s] != idx:  # the mirror and the decode layout must slice alike (same tp, same specs)
                raise RuntimeError(f"weight push: device {s} holds {index[s]} but sampler device {d} needs {idx}")
            arrays.append(jax.device_put(src[s], d))
            self.pushed_bytes += arrays[-1].nbytes
        return jax.make_array_from_single_device_arrays(x.shape, target, arrays)

    def check_landed(self, weights: DecodeWeights, version: int) -> None:
        """Raises ``StaleWeightsError`` unless ``weights`` were pushed for ``version`` (split layouts only)."""
        if not self.split:
            return
        got = None if weights.version is None else int(np.asarray(weights.version.addressable_data(0)))
        if got != version:
            raise StaleWeightsError(f"the sampler's weights are policy version {got}, the learner pushed version "
                                    f"{version}: the weight push did not land (decoding would use stale weights)")

    def lower(self, state):
        """The copy program lowered for ``state`` (abstract or real), for its memory analysis."""
        return self._program(state).lower(state)

    def abstract(self, state):
        """``ShapeDtypeStruct``s of the decode copy of ``state`` with their decode shardings."""
        leaves, treedef = jax.tree.flatten(state)
        target = [None] * len(leaves) if self.mesh is None else jax.tree.leaves(self._target(state))
        return treedef.unflatten([jax.ShapeDtypeStruct(x.shape, _cast_dtype(x, self.dtype), sharding=s)
                                  for x, s in zip(leaves, target)])  # fmt: skip

    def describe_bytes(self, per_device: int) -> str:
        if self.split:
            return (f"sampler mesh of {self.mesh.devices.size} device(s), decode copy in {self.dtype.name}, "
                    f"tensor-parallel over {self.tensor_parallel} x {self.groups} group(s): {per_device / 1e9:.2f} GB "
                    f"per device, pushed from the learner's {self.train_mesh.devices.size} device(s) every step")
        if not per_device:
            return "decodes from the parameters themselves (already in the decode dtype and layout: no copy)"
        if self.mesh is None:
            return f"decode copy in {self.dtype.name}: {per_device / 1e9:.2f} GB"
        return (f"decode copy in {self.dtype.name}, tensor-parallel over {self.tensor_parallel} device(s) x "
                f"{self.groups} group(s): {per_device / 1e9:.2f} GB per device")  # fmt: skip
