"""trainer/checkpoint.py's Orbax settings: a shard replicated over several devices is written whole by one
replica below REPLICA_PARALLEL_MIN_BYTES per slice (no slicing program compiled per shape and device), and the
arrays come back the same."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from echorl_jax.sharding import make_mesh
from echorl_jax.trainer import checkpoint as ckpt_lib


def test_small_replicated_arrays_are_saved_without_slicing_programs_and_restored(tmp_path, caplog):
    mesh = make_mesh((1, 8, 1))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("fsdp"))
    state = {"norm": jax.device_put(jnp.arange(24, dtype=jnp.float32), replicated),  # 96 bytes on every device
             "bias": jax.device_put(jnp.arange(40, dtype=jnp.float32).reshape(8, 5), replicated),
             "w": jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(16, 4), sharded)}  # fmt: skip
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"))
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        ck.save(1, state, {"data": 1})
        ck.wait()
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert not any("slice" in m for m in compiled), compiled  # each replicated shard written whole
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    assert handler._min_slice_bytes_for_replica_parallel == ckpt_lib.REPLICA_PARALLEL_MIN_BYTES
    assert handler._array_metadata_store is not None  # Orbax's default otherwise
    step, got, host = ck.restore(state)
    ck.close()
    assert step == 1 and host == {"data": 1}
    for k in state:
        assert got[k].sharding == state[k].sharding, k
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(state[k]))
