"""Meshes, logical-axis shardings, and sharded loading vs one device (8 fake CPU devices)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from echorl_jax.models.config import ModelConfig
from echorl_jax.models.hf import export_model, load_model
from echorl_jax.models.transformer import Transformer, positions_from_valid
from echorl_jax.sharding import (
    logical_to_spec,
    make_mesh,
    resolve_mesh_shape,
    shard_batch,
    shard_model,
    state_shardings,
)

# 4 heads, 2 kv heads, mlp 96, vocab 128, hidden 64: on tensor=4 the kv heads do not divide
# and must stay replicated while everything else shards.
CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, tie_embeddings=False, attention_bias=False)  # fmt: skip


# --------------------------------------------------------------------------- mesh shapes


@pytest.mark.parametrize(
    "shape, want",
    [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)), ((1, 2, -1), (1, 2, 4)), ((2, 2, 2), (2, 2, 2))],
)
def test_resolve_mesh_shape(shape, want):
    assert resolve_mesh_shape(shape, 8) == want


@pytest.mark.parametrize(
    "shape, message",
    [
        ((8, 1), r"mesh shape \(8, 1\) must have 3 entries"),
        ((-1, -1, 2), r"mesh shape \(-1, -1, 2\): entries must be positive, with at most one -1"),
        ((0, 8, 1), r"mesh shape \(0, 8, 1\): entries must be positive"),
        ((-2, 4, 1), r"mesh shape \(-2, 4, 1\): entries must be positive"),
        ((3, -1, 1), r"mesh shape \(3, -1, 1\): 8 devices are not divisible by 3"),
        ((2, 2, 1), r"mesh shape \(2, 2, 1\) uses 4 devices but 8 are available"),
    ],
)
def test_resolve_mesh_shape_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        resolve_mesh_shape(shape, 8)


def test_make_mesh():
    mesh = make_mesh((2, -1, 2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert make_mesh((1, 1, 1), jax.devices()[:1]).size == 1


def test_logical_to_spec_keeps_non_dividing_dims_replicated():
    mesh = make_mesh((1, 2, 4))
    axes = ("layers", "embed", "heads", "head_dim")
    assert logical_to_spec(axes, (2, 64, 4, 16), mesh) == P(None, "fsdp", "tensor", None)
    assert logical_to_spec(axes, (2, 64, 2, 16), mesh) == P(None, "fsdp", None, None)  # 2 heads on tensor=4
    # 6 rows: "data" (2) divides, "data" x "fsdp" (4) does not, so only "data" is kept.
    assert logical_to_spec(("batch", None), (6, 3), make_mesh((2, 2, 2))) == P("data", None)
    assert logical_to_spec(("batch", None), (8, 3), make_mesh((2, 2, 2))) == P(("data", "fsdp"), None)


def test_state_shardings_of_an_abstract_model():
    abstract = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))
    shardings = nnx.to_pure_dict(state_shardings(nnx.state(abstract), make_mesh((1, 2, 4))))
    assert shardings["wq"].spec == P(None, "fsdp", "tensor", None)


# --------------------------------------------------------------------------- sharded loading


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An exported random model: every parameter (norms included) is non-trivial."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    state = nnx.to_pure_dict(nnx.state(model))
    nnx.update(model, {k: v + rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in state.items()})
    path = str(tmp_path_factory.mktemp("ckpt"))
    export_model(model, path)
    return path


@nnx.jit
def forward(model, tokens, positions, valid):
    return model(tokens, positions, valid)[0]


def _batch():
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, CFG.vocab_size, (8, 12)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    valid[1::2, :4] = False  # half the rows left-padded
    return tokens, np.asarray(positions_from_valid(valid)), valid


@pytest.fixture(scope="module")
def single_device_logits(checkpoint):
    model = load_model(checkpoint)
    assert {d for x in jax.tree.leaves(nnx.state(model)) for d in x.devices()} == {jax.devices()[0]}
    return np.asarray(forward(model, *_batch()))


# Expected specs of a few parameters per mesh: "embed" -> fsdp; vocab/heads/mlp -> tensor;
# 2 kv heads do not divide a tensor axis of 4.
EXPECTED = {
    (8, 1, 1): dict(embed=P(None, None), wq=P(None, None, None, None), wk=P(None, None, None, None)),
    (2, 2, 2): dict(embed=P("tensor", "fsdp"), wq=P(None, "fsdp", "tensor", None), wk=P(None, "fsdp", "tensor", None),
                    w_down=P(None, "tensor", "fsdp"), lm_head=P("fsdp", "tensor")),  # fmt: skip
    (1, 2, 4): dict(embed=P("tensor", "fsdp"), wq=P(None, "fsdp", "tensor", None), wk=P(None, "fsdp", None, None),
                    w_gate=P(None, "fsdp", "tensor"), attn_norm=P(None, None)),  # fmt: skip
}


@pytest.mark.parametrize("shape", list(EXPECTED))
def test_sharded_load_matches_single_device(shape, checkpoint, single_device_logits):
    mesh = make_mesh(shape)
    model = load_model(checkpoint, mesh=mesh)
    params = nnx.to_pure_dict(nnx.state(model))
    for name, spec in EXPECTED[shape].items():
        assert params[name].sharding.spec == spec, name
    for name, x in params.items():
        assert x.sharding.mesh == mesh, name
        local = x.sharding.shard_shape(x.shape)
        assert all(s.data.shape == local for s in x.addressable_shards), name
    assert params["wq"].addressable_shards[0].data.shape == (2, 64 // shape[1], 4 // shape[2], 16)

    # Same values and placement as loading on one device and then resharding.
    reference = shard_model(load_model(checkpoint), mesh)
    for name, x in nnx.to_pure_dict(nnx.state(reference)).items():
        assert x.sharding == params[name].sharding, name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(params[name]), err_msg=name)

    logits = np.asarray(forward(model, *shard_batch(_batch(), mesh)))
    tokens, _, valid = _batch()
    # fp32 relative 1e-5 (logits here reach ~6.5): a per-device batch of 1 changes the CPU matmul
    # summation order, and one device running the rows one at a time differs by as much (1.2e-5).
    scale = np.abs(single_device_logits).max()
    assert np.abs(logits - single_device_logits)[valid].max() <= 1e-5 * scale


# ----------------------------------------------------------------------------- meshes from the TPU topology


class FakeTpu:
    """What mesh_utils reads of a TPU device: kind, physical coordinates, core, process, slice."""

    platform, device_kind, core_on_chip = "tpu", "TPU v4", 0

    def __init__(self, id, coords, process_index, slice_index=0):
        self.id, self.coords, self.process_index, self.slice_index = id, coords, process_index, slice_index

    def __repr__(self):
        return f"tpu{self.id}{self.coords}"


def _v4_cube(slice_index=0, first_id=0):
    """A 2x2x2 v4 slice (8 chips, 2 hosts of 4) whose ids do not follow the coordinates."""
    coords = [(x, y, z) for z in range(2) for y in range(2) for x in range(2)]
    ids = [0, 5, 2, 7, 4, 1, 6, 3]  # a device order that is not physical
    return [FakeTpu(first_id + i, c, process_index=2 * slice_index + (c[2]), slice_index=slice_index)
            for i, c in zip(ids, coords)]  # fmt: skip


def _neighbours(a, b) -> bool:
    return sum(abs(p - q) for p, q in zip(a.coords, b.coords)) == 1


def _compact(group) -> bool:
    """The chips form a sub-cuboid of the torus (bounding box == group size): their collectives stay on the
    ICI links among them."""
    c = np.asarray([d.coords for d in group])
    return np.prod(c.max(0) - c.min(0) + 1) == len(group)


def test_mesh_on_cpu_keeps_the_device_order():
    devices = jax.devices()
    np.testing.assert_array_equal(make_mesh((2, 2, 2)).devices.reshape(-1), np.asarray(devices))


def test_tpu_mesh_puts_the_tensor_axis_on_neighbouring_chips():
    devices = sorted(_v4_cube(), key=lambda d: d.id)  # jax.devices() order: by id
    naive = np.asarray(devices).reshape(2, 1, 4)
    assert not all(_compact(group) for group in naive[:, 0])  # what the plain reshape gave
    mesh = make_mesh((2, 1, 4), devices)
    assert sorted(d.id for d in mesh.devices.reshape(-1)) == list(range(8))
    for group in mesh.devices[:, 0]:  # each tensor group is a 2x2 face of the cube
        assert _compact(group), group
    for d, f, t in np.ndindex(2, 1, 4):  # and the data axis joins neighbours
        assert _neighbours(mesh.devices[0, f, t], mesh.devices[1, f, t])


def test_two_tpu_slices_split_the_data_axis_over_dcn():
    devices = _v4_cube(0) + _v4_cube(1, first_id=8)
    mesh = make_mesh((2, 2, 4), devices)
    for d in range(2):  # one slice per data index: only the data axis crosses the slower network
        assert {x.slice_index for x in mesh.devices[d].reshape(-1)} == {d}
    for group in mesh.devices.reshape(4, 4):  # tensor groups inside a slice, compact
        assert _compact(group), group
    with pytest.warns(UserWarning, match="no topology-aware layout .*multiple of the slice count"):
        make_mesh((1, 1, 16), devices)  # cannot split over 2 slices: jax.devices() order, with a warning
