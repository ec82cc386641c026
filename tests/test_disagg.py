"""Disaggregated rollouts (mesh.sampler_devices): a sampler mesh and a learner mesh in one program.

References: numpy casts of the learner's parameters (the push), the colocated trainer on the learner's devices
(k = 0), the version tags of the straight run (the bound, resume), and a push made to do nothing (the check)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echorl_jax import config as config_lib, sharding
from echorl_jax.models.config import ModelConfig
from echorl_jax.models.transformer import Transformer
from echorl_jax.sampling import layout as layout_lib
from echorl_jax.trainer.train import train
from tests.multiproc import assert_rows_close
from tests.test_train import _params, _rows, tiny_cfg

STREAM = {"rl": {"max_staleness": 1, "stream_batches": 1, "recompute_logp": True},
          "objective": {"rollout_correction": "token_tis"}}  # fmt: skip

FakeDevice = collections.namedtuple("FakeDevice", "id process_index")


def _cfg(workdir, **sections):
    merged = {k: dict(v) for k, v in STREAM.items()}
    for name, fields in sections.items():
        merged[name] = {**merged.get(name, {}), **fields}
    merged["mesh"] = {"sampler_devices": 4, **merged.get("mesh", {})}
    return tiny_cfg(workdir, **merged)


def test_every_process_gives_the_sampler_its_last_devices():
    devices = [FakeDevice(i, i // 4) for i in range(8)]  # 2 processes x 4 devices
    learner, sampler = sharding.split_devices(devices, 4)
    assert [d.id for d in learner] == [0, 1, 4, 5] and [d.id for d in sampler] == [2, 3, 6, 7]
    assert sharding.split_devices(devices, 0) == (devices, [])
    for bad in (3, 8):  # not a multiple of the process count; no learner device left
        with pytest.raises(ValueError, match=f"mesh.sampler_devices={bad}"):
            sharding.split_devices(devices, bad)


def test_the_config_names_what_a_split_needs(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="rl.stream_batches=2 is invalid: with mesh.sampler_devices"):
        _cfg(tmp_path, rl={"stream_batches": 2})
    with pytest.raises(config_lib.ConfigError, match="mesh.sampler_devices=-1"):
        tiny_cfg(tmp_path, mesh={"sampler_devices": -1})
    with pytest.raises(config_lib.ConfigError, match="mesh.sampler_devices=8 must be a multiple"):
        train(_cfg(tmp_path, mesh={"sampler_devices": 8}))


def test_the_push_moves_every_slice_to_the_sampler_devices_and_carries_the_version():
    """FSDP over 4 learner devices -> bf16, tensor-parallel 2 over the 4 sampler devices: values are the numpy
    cast, every shard lies on a sampler device with the decode layout's slice, the bytes counted are the shards'."""
    devices = jax.devices()
    learner = sharding.make_mesh((1, 4, 1), devices[:4])
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    model = sharding.shard_model(Transformer(cfg, rngs=nnx.Rngs(0)), learner)
    state = nnx.state(model)
    layout = layout_lib.DecodeLayout(learner, 2, jnp.bfloat16, devices[4:])
    weights = layout.copy(state, version=3)
    want = jax.tree.leaves(sharding.state_shardings(state, layout.mesh))
    total = 0
    for x, got, target in zip(jax.tree.leaves(state), jax.tree.leaves(weights.params), want):
        assert got.sharding.device_set == set(devices[4:]) and got.sharding.is_equivalent_to(target, got.ndim)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x).astype(jnp.bfloat16).astype(np.float32))
        total += sum(sh.data.nbytes for sh in got.addressable_shards)
    assert layout.pushed_bytes == total + 4 * 4  # + the int32 version on each sampler device
    layout.check_landed(weights, 3)
    with pytest.raises(layout_lib.StaleWeightsError, match="version 3, the learner pushed version 4"):
        layout.check_landed(weights, 4)


@pytest.mark.slow  # a short run; CI's slow set runs it
def test_a_push_that_did_not_land_stops_the_run(tmp_path, monkeypatch):
    """A reshard that silently does nothing (every push after the first returns the first push's arrays, as in
    Tunix PR #1704) is an error before the sampler decodes, not stale rollouts."""
    first: dict[int, jax.Array] = {}  # the first push's arrays, by position in a push
    at = {"copy": 0, "i": 0}
    real = layout_lib.DecodeLayout._transfer

    def stuck(self, x, target):
        if self.copies != at["copy"]:
            at["copy"], at["i"] = self.copies, 0
        at["i"] += 1
        if self.copies == 1:
            first[at["i"]] = real(self, x, target)
        return first[at["i"]]

    monkeypatch.setattr(layout_lib.DecodeLayout, "_transfer", stuck)
    with pytest.raises(layout_lib.StaleWeightsError, match="the weight push did not land"):
        train(_cfg(tmp_path, train={"steps": 3, "export_hf": False}, data={"eval": ""}))


@pytest.mark.slow  # two short runs; CI's slow set runs it
def test_k0_on_a_sampler_mesh_is_the_synchronous_trainer(tmp_path):
    """k = 0 with 4 sampler + 4 learner devices equals the colocated trainer on 4 devices: the same learner
    mesh, the same decode layout on other devices, weights pushed instead of copied."""
    steps = {"train": {"steps": 3, "export_hf": False}}
    colocated = train(tiny_cfg(tmp_path / "colocated", mesh={"num_devices": 4}, **steps))
    split = train(tiny_cfg(tmp_path / "split", mesh={"sampler_devices": 4}, **steps))
    assert len(_rows(tmp_path / "split")) == 3
    assert_rows_close(_rows(tmp_path / "split"), _rows(tmp_path / "colocated"))
    assert_rows_close(_rows(tmp_path / "split", "eval"), _rows(tmp_path / "colocated", "eval"))
    for x, y in zip(jax.tree.leaves(_params(colocated)), jax.tree.leaves(_params(split))):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # three short runs; CI's slow set runs it
def test_k1_on_a_sampler_mesh_overlaps_keeps_the_bound_and_resumes_exactly(tmp_path):
    """k = 1: from step 2 on every loss token was drawn one version back (the batch decoded during the last
    update), none older; the sampler was busy while the learner was; a run stopped at step 2 and resumed equals
    the straight one (the round dispatched during step 2's update comes back from the checkpoint)."""
    straight = train(_cfg(tmp_path / "a", train={"steps": 4, "save_every": 2}))
    rows = _rows(tmp_path / "a")
    assert [r["staleness/lag1_frac"] for r in rows] == [0.0, 1.0, 1.0, 1.0]
    assert max(r["staleness/max_lag"] for r in rows) == 1
    assert all(r["push/bytes"] > 0 for r in rows)
    timed = [r for r in _rows_all(tmp_path / "a") if "time/both_busy" in r]
    assert len(timed) == 4  # every step dispatched the next round during its update (bench/disagg.py times it)
    train(_cfg(tmp_path / "b", train={"steps": 2, "save_every": 2}))
    resumed = train(_cfg(tmp_path / "b", train={"steps": 4, "save_every": 2}))
    assert _rows(tmp_path / "b") == rows
    for x, y in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(resumed))):
        np.testing.assert_array_equal(x, y)


def _rows_all(workdir):
    from echorl_jax.trainer.metrics_log import read_jsonl

    return [r for r in read_jsonl(workdir / "metrics.jsonl") if r["kind"] == "train"]

