"""Device mesh, logical-axis rules and placement helpers.

Mesh axes are ``("data", "fsdp", "tensor")``. Parameters name their dimensions
with logical axes (``embed``, ``mlp``, ``heads`` …, see models/transformer.py);
``LOGICAL_RULES`` is the one table that maps them onto mesh axes. A dimension
whose size the mesh axis does not divide stays replicated (e.g. 2 kv heads on
a tensor axis of 4), so every config runs on every mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: dict[str, Any] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
}


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills a single ``-1`` so the product equals ``num_devices``; errors name the shape."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: entries must be positive, with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} uses {math.prod(shape)} devices but {num_devices} are available")
    return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(shape, len(devices))
    return Mesh(device_grid(shape, devices), MESH_AXES)


def split_devices(devices: Sequence[jax.Device], sampler_devices: int) -> tuple[list, list]:
    """``(learner, sampler)`` devices for ``mesh.sampler_devices``: every process gives the sampler the last
    ``sampler_devices / processes`` of its own devices, so a device's weights and rows move to a device of
    the same process (no transfer crosses hosts). Both lists keep ``devices``' order. 0 = no split."""
    devices = list(devices)
    if not sampler_devices:
        return devices, []
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    hosts = len(by_process)
    per = sampler_devices // hosts
    local = min(len(v) for v in by_process.values())
    if sampler_devices % hosts or not 0 < per < local:
        raise ValueError(f"mesh.sampler_devices={sampler_devices} must be a multiple of the process count ({hosts}) "
                         f"that leaves every process a learner device (each has {local} of the {len(devices)} devices)")
    sampler = {id(d) for v in by_process.values() for d in v[len(v) - per :]}
    return [d for d in devices if id(d) not in sampler], [d for d in devices if id(d) in sampler]


def device_grid(shape: tuple[int, ...], devices: Sequence[jax.Device]) -> np.ndarray:
    """``devices`` as an array of ``shape``, the last (``tensor``) axis varying fastest.

    TPU: laid out by the chips' physical coordinates (``mesh_utils.create_device_mesh``), so each mesh axis
    runs along ICI rings and the tensor axis, which has the most traffic, joins neighbouring chips. Several
    slices (``slice_index``, linked by the slower DCN): ``create_hybrid_device_mesh`` with the slices along
    ``data`` (else ``fsdp``), whose collectives are the rarest. CPU and GPU: ``devices`` in order, as given
    (``jax.devices()``: a process's devices are consecutive). A layout mesh_utils cannot build falls back to
    that order with a warning.
    """
    if not devices or devices[0].platform != "tpu":
        return np.asarray(devices).reshape(shape)
    from jax.experimental import mesh_utils

    slices = sorted({getattr(d, "slice_index", 0) for d in devices})
    try:
        if len(slices) == 1:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        axis = next((i for i in (0, 1) if shape[i] % len(slices) == 0), None)
        if axis is None:
            raise ValueError(f"{len(slices)} slices: mesh.shape's data or fsdp axis must be a multiple of the slice "
                             "count to split it over the data-center network")  # fmt: skip
        dcn = [1] * len(shape)
        dcn[axis] = len(slices)
        ici = [n // d for n, d in zip(shape, dcn)]
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
        import warnings

        warnings.warn(f"mesh.shape={shape}: no topology-aware layout ({e}); using jax.devices() order", stacklevel=2)
        return np.asarray(devices).reshape(shape)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array whose dimensions have logical names ``axes``."""
    spec, used = [], set()
    for name, size in zip(axes, shape):
        target = LOGICAL_RULES.get(name) if name else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        # Keep only mesh axes of size > 1 that are unused and divide the dimension.
        kept = []
        for ax in names:
            n = mesh.shape[ax]
            if n > 1 and ax not in used and size % (n * math.prod(mesh.shape[a] for a in kept)) == 0:
                kept.append(ax)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every variable of an nnx state, from its ``logical_axes`` metadata."""

    def one(var):
        # get_value(), not var[...]: the state may be abstract (ShapeDtypeStruct, from nnx.eval_shape).
        shape = var.get_value().shape
        axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
        return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

    return jax.tree.map(one, state, is_leaf=_is_var)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places a model's variables on their mesh shardings (in place) and returns it."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh)
    state = jax.tree.map(lambda x, s: jax.device_put(x, s), nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    nnx.update(model, state)
    return model


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading dimension over the batch axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Host numpy (or device) arrays -> global arrays sharded over the batch axes.

    Single process: a plain device_put. Multi-host: each process passes its own rows
    and ``make_array_from_process_local_data`` assembles the global array.
    """

    def one(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        sharding = batch_sharding(mesh, x.ndim) if x.ndim else replicated(mesh)
        if jax.process_count() > 1 and not isinstance(x, jax.Array):
            return jax.make_array_from_process_local_data(sharding, x)
        return jax.device_put(x, sharding)

    return jax.tree.map(one, tree)


def move_rows(tree: Any, mesh: Mesh) -> Any:
    """Arrays batch-sharded on other devices (a sampler mesh of its own) -> batch-sharded over ``mesh``.

    One process: ``jax.device_put`` (device to device). Several: each process's rows of ``x`` go to its own
    rows of the result through the host (rows are process-major on both meshes; rollouts are small)."""

    def one(x):
        target = batch_sharding(mesh, x.ndim) if x.ndim else replicated(mesh)
        if x.is_fully_addressable:
            return jax.device_put(x, target)
        if not x.ndim:
            return jax.device_put(np.asarray(x.addressable_data(0)), target)
        n = x.shape[0] // jax.process_count()
        lo = jax.process_index() * n
        local, filled = np.zeros((n, *x.shape[1:]), x.dtype), np.zeros(n, bool)
        for sh in x.addressable_shards:  # this process's block of rows, from whichever of its shards hold them
            a, b = sh.index[0].indices(x.shape[0])[:2]
            a2, b2 = max(a, lo), min(b, lo + n)
            if a2 < b2:
                local[a2 - lo : b2 - lo] = np.asarray(sh.data)[a2 - a : b2 - a]
                filled[a2 - lo : b2 - lo] = True
        if not filled.all():
            raise RuntimeError(f"move_rows: rows [{lo}, {lo + n}) of a {x.shape} array are not all on process "
                               f"{jax.process_index()}'s devices (rows must be process-major)")
        return jax.make_array_from_process_local_data(target, local)

    return jax.tree.map(one, tree)


def batch_divisor(mesh: Mesh) -> int:
    """Global batch sizes must be multiples of this (the size of the batch axes)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


# ----------------------------------------------------------------------------- activations
# Parameters carry their shardings; activations get theirs from XLA's propagation, which inside the
# scanned layer can pick the weights' layout over the batch's: on an FSDP mesh (weights' embed dimension
# over fsdp) it then replicates the rows and all-reduces partial sums -- every device computes the whole
# micro-batch. ``constrain_rows`` pins a model activation to rows over the batch axes of the mesh the
# program is traced for (``traced_on``); outside one it does nothing.

_TRACE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("echorl_trace_mesh", default=None)


def traced_on(mesh: Mesh | None, fn: Callable) -> Callable:
    """``fn`` whose tracing sees ``mesh`` (for ``constrain_rows``); wrap before ``jax.jit``."""

    @functools.wraps(fn)
    def inner(*args, **kwargs):
        token = _TRACE_MESH.set(mesh)
        try:
            return fn(*args, **kwargs)
        finally:
            _TRACE_MESH.reset(token)

    return inner


@contextlib.contextmanager
def tracing_on(mesh: Mesh | None):
    """Context form of ``traced_on`` (for code that traces inline, e.g. ``jax.eval_shape``)."""
    token = _TRACE_MESH.set(mesh)
    try:
        yield
    finally:
        _TRACE_MESH.reset(token)


def constrain_rows(x: jax.Array) -> jax.Array:
    """``x [b, ...]`` with rows over the batch axes of the traced-for mesh; unchanged without one, or when
    the batch axes do not divide ``b`` (a decode batch smaller than the mesh)."""
    mesh = _TRACE_MESH.get()
    if mesh is None or x.ndim == 0:
        return x
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axes, *([None] * (x.ndim - 1)))))


# ----------------------------------------------------------------------------- multi-process helpers
# Every process runs the same program. Host data (prompts, rewards) is per process: each holds its own
# rows, in process order, and these helpers turn it into values every process agrees on. With one
# process they are plain conversions.


def to_host(x: Any) -> np.ndarray:
    """The full value of an array as numpy on every process (an all-gather when it spans processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_rows(x: Any) -> np.ndarray:
    """Each process's rows (the same count everywhere), concatenated in process order, on every process."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def process_rows(rows_per_process: int) -> slice:
    """This process's block of a batch gathered with ``gather_rows``."""
    p = jax.process_index()
    return slice(p * rows_per_process, (p + 1) * rows_per_process)


def gather_objects(obj: Any) -> list[Any]:
    """A JSON-serialisable value from every process, in process order (e.g. verifier counters whose keys
    differ between hosts)."""
    if jax.process_count() == 1:
        return [obj]
    import json

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = gather_rows(np.asarray([data.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    rows = gather_rows(padded[None])
    return [json.loads(bytes(r[:n]).decode()) for r, n in zip(rows, sizes)]


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (e.g. SIGTERM seen by one host)."""
    return bool(gather_rows(np.asarray([flag], np.int32)).any())
