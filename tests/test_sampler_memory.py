"""The sampler within a memory budget: live-cache decode attention, no transient cache copies,
the KV budget that chooses the decode slots, and the decode copy of the weights (sampling/budget.py,
sampling/layout.py, models/decode_attention.py). References: the xla attention over the whole cache,
slow loops in numpy, and the rollouts of tests/test_sampling.py's and test_slot_refill.py's samplers."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echorl_jax.models.attention import xla_attention
from echorl_jax.models.config import ModelConfig
from echorl_jax.models.decode_attention import LiveKeys, decode_attention
from echorl_jax.models.transformer import Transformer
from echorl_jax.sampling.budget import budget_bytes, kv_row_bytes
from echorl_jax.sampling.config import SamplingConfig
from echorl_jax.sampling.decode import block_buckets, decode_block, refill_extent, response_columns
from echorl_jax.sampling.layout import DecodeLayout, auto_tensor_parallel, copy_bytes_per_device
from echorl_jax.sampling.sampler import Rollout, make_sampler
from echorl_jax.sharding import make_mesh, shard_model
from tests.test_slot_refill import LENGTHS_N, PAD, PROMPTS_NP, SAMPLED, STOP, STOP_AT, TINY, G, assert_same


@pytest.fixture(scope="module")
def split():
    return nnx.split(Transformer(TINY, rngs=nnx.Rngs(0)))


def run(graphdef, state, cfg, *, mesh=None, block=None, seed=1):
    sampler = make_sampler(graphdef, cfg, group_size=G, stop_ids=(STOP,), pad_id=PAD, mesh=mesh, decode_block=block)
    r = sampler(state, PROMPTS_NP, LENGTHS_N, jax.random.key(seed), bench_stop_lengths=STOP_AT)
    return Rollout(*(np.asarray(x) for x in r)), sampler


@pytest.fixture(scope="module")
def reference(split):
    """The plain sampler at its default block (one block: it reads the whole response region)."""
    return run(*split, SAMPLED)[0]


# ----------------------------------------------------------------------------- live-cache attention


def test_decode_attention_reads_only_the_named_blocks():
    """Equals the xla reference over the whole cache, for a contiguous (plain loop) and a wrapped
    circular (refill ring) window; NaN in every column it must not read leaves it finite and equal."""
    rng = np.random.default_rng(0)
    layers, b, g, r, d, p, block, ring_blocks = 2, 3, 2, 2, 8, 5, 4, 6
    k = p + block * ring_blocks
    q = jnp.asarray(rng.normal(size=(b, 1, g * r, d)), jnp.float32)
    k_l = jnp.asarray(rng.normal(size=(layers, b, g, k, d)), jnp.float32)
    v_l = jnp.asarray(rng.normal(size=(layers, b, g, k, d)), jnp.float32)
    for first, blocks in ((0, 3), (4, 4)):  # blocks 0-2; blocks 4, 5, 0, 1 (wraps)
        read = np.zeros(k, bool)
        read[:p] = True
        for j in range(blocks):
            c = p + ((first + j) % ring_blocks) * block
            read[c : c + block] = True
        valid = rng.random((b, k)) < 0.7
        valid[:, 0] = True
        valid &= read[None]  # a row sees keys only inside the window
        poisoned = lambda x: jnp.where(jnp.asarray(read)[None, None, None, :, None], x, jnp.nan)  # noqa: E731
        live = LiveKeys(p, block, blocks, ring_blocks, first)
        got = decode_attention(q, poisoned(k_l), poisoned(v_l), 1, jnp.asarray(valid), live)
        want = xla_attention(q, k_l[1], v_l[1], jnp.asarray(valid), q_start=k - 1)
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


def test_refill_extent_covers_every_live_key_with_the_fewest_blocks():
    """``refill_extent`` vs a slow loop: the blocks holding each active slot's circular window of
    keys (its step count of columns ending at this iteration's column); the window that many blocks
    back from the current one covers them all."""
    rng = np.random.default_rng(1)
    block, ring = 4, 24
    nbr = ring // block
    for _ in range(300):
        steps = int(rng.integers(0, 200))
        step_s = rng.integers(0, ring, size=5)  # a rollout's step is < T <= ring
        active_s = rng.random(5) < 0.7
        col = steps % ring
        needed = {col // block}
        for step, active in zip(step_s, active_s):
            if active:
                needed |= {((col - i) % ring) // block for i in range(step)}
        got = int(refill_extent(jnp.int32(steps), jnp.asarray(step_s, jnp.int32), jnp.asarray(active_s), block, ring))
        window = {(col // block - j) % nbr for j in range(got)}
        assert needed <= window, (steps, step_s, active_s)
        assert got == len(needed) or (got == nbr and len(needed) == nbr)


def test_block_and_bucket_arithmetic():
    assert [decode_block(t) for t in (8, 48, 256, 1024, 8192)] == [16, 16, 16, 64, 512]
    assert response_columns(28, 16) == 32 and response_columns(8192, 512) == 8192
    assert block_buckets(16) == [1, 2, 3, 4, 6, 8, 12, 16] and block_buckets(1) == [1] and block_buckets(5) == [1, 2, 3, 4, 5]
    for n in (1, 5, 16, 40):  # each bucket at most 1.5x the one before: a step reads <= 1.5x its live blocks
        bs = block_buckets(n)
        assert bs[-1] == n and all(1 < b / a <= 1.5 for a, b in zip(bs[2:], bs[3:]))


@pytest.mark.parametrize("block", [2, 3])
def test_live_blocks_give_the_same_rollouts(split, reference, block):
    """Plain and refill loops reading 2- or 3-column blocks (several segments, a wrapping ring)
    equal the whole-cache reference rollout by rollout."""
    graphdef, state = split
    for slots in (0, 5):
        got, sampler = run(graphdef, state, dataclasses.replace(SAMPLED, slots=slots), block=block)
        assert_same(got, reference)
    assert sampler.last_decode_steps > SAMPLED.max_new_tokens  # the ring wrapped


# ----------------------------------------------------------------------------- no transient cache copy

# A shape where the KV cache dominates: 8 layers x 4 kv heads of 16, P 8 + T 64, 32 rollouts (8 slots).
WIDE = ModelConfig(vocab_size=48, hidden_size=64, intermediate_size=64, num_layers=8, num_heads=4, num_kv_heads=4)


@pytest.mark.parametrize("slots", [0, 8])
def test_sampler_temporaries_are_the_kv_cache_plus_a_small_margin(slots):
    """XLA's memory analysis of the compiled sampler (one device): temporaries <= KV cache + the
    prompt cache (N x P) + the [B, T] outputs and their [B, P+T] assembly twice + one layer's
    cache twice (the k/v blocks one layer's step reads: XLA:CPU copies a dot's sliced operand, and
    the unrolled blocks may all be live) + 64 KiB: no second copy of the cache. Before, the plain
    loop's repeat and growing copies and the refill loop's buffers took 1.53x / 1.61x the cache
    (2 layers, P 16 + T 256)."""
    n, g, p, t = 8, 4, 8, 64
    graphdef, params = nnx.split(Transformer(WIDE, rngs=nnx.Rngs(0)))
    sampler = make_sampler(graphdef, SamplingConfig(max_new_tokens=t, slots=slots), group_size=g, stop_ids=(3,),
                           pad_id=0)  # fmt: skip
    plan = sampler.prepare(params, p)
    mem = sampler.lower(plan.layout.abstract(params), jnp.zeros((n, p), jnp.int32), jnp.full((n,), p, jnp.int32),
                        jax.random.key(0)).compile().memory_analysis()  # fmt: skip
    kv = plan.kv_bytes(n * g)
    assert kv == plan.rows(n * g)[0] * kv_row_bytes(WIDE, 1, p, t, decode_block(t))
    prompt_cache = n * kv_row_bytes(WIDE, 1, p, 0, 1)
    outputs = n * g * (t * (4 + 1 + 4 + 4) + (p + t) * (4 + 1))
    margin = prompt_cache + 2 * outputs + 2 * kv // WIDE.num_layers + 64 * 1024
    assert kv < mem.temp_size_in_bytes <= kv + margin, (mem.temp_size_in_bytes, kv, margin)
    assert margin < kv / 2  # a second copy of the cache cannot hide in the margin


# ----------------------------------------------------------------------------- the KV budget


def test_budget_config_validation():
    SamplingConfig(kv_cache_memory=0.5).validate()
    SamplingConfig(kv_cache_memory=20e9, decode_tensor_parallel=2).validate()
    for bad in (dict(kv_cache_memory=-1.0), dict(kv_cache_memory=1.0), dict(kv_cache_memory=100.0),
                dict(kv_cache_memory=float("inf")), dict(kv_cache_memory=0.5, slots=8),
                dict(decode_tensor_parallel=-1)):  # fmt: skip
        with pytest.raises(ValueError, match="sampling.(kv_cache_memory|decode_tensor_parallel)="):
            SamplingConfig(**bad).validate()
    with pytest.raises(ValueError, match="sampling.kv_cache_memory=0.3 is a fraction.*give the budget in bytes"):
        budget_bytes(0.3, None)
    assert budget_bytes(0.25, 80 * 10**9) == 20 * 10**9 and budget_bytes(5e9, None) == 5 * 10**9


def test_budget_chooses_whole_rows_per_group_and_refills(split, reference):
    """Rows = floor(budget / row bytes) per decode group x groups, capped by N·G (then one row per
    rollout); the rollouts equal the reference either way. A budget below one row fails naming it."""
    graphdef, state = split
    p, t = PROMPTS_NP.shape[1], SAMPLED.max_new_tokens
    row = kv_row_bytes(TINY, 1, p, t, decode_block(t))
    assert row == 2 * TINY.num_layers * TINY.num_kv_heads * TINY.dim_per_head * (p + 16) * 4
    cfg = dataclasses.replace(SAMPLED, kv_cache_memory=float(4 * row + row // 2))
    got, sampler = run(graphdef, state, cfg)
    assert sampler.plans[p].rows(12) == (4, True)
    assert_same(got, reference)
    many = make_sampler(graphdef, dataclasses.replace(cfg, kv_cache_memory=float(100 * row)), group_size=G,
                        stop_ids=(STOP,), pad_id=PAD)  # fmt: skip
    assert many.prepare(state, p).rows(12) == (12, False)
    few = make_sampler(graphdef, dataclasses.replace(SAMPLED, kv_cache_memory=4096.0), group_size=G, stop_ids=(STOP,),
                       pad_id=PAD)  # fmt: skip
    with pytest.raises(ValueError, match=r"sampling.kv_cache_memory=4096 .* holds no decode row: one row of P 6 \+ T 8"):
        few.prepare(state, p)
    # A fraction of a reported memory size; on a mesh rows are whole per decode group.
    frac = make_sampler(graphdef, dataclasses.replace(SAMPLED, kv_cache_memory=0.5, decode_tensor_parallel=1),
                        group_size=G, stop_ids=(STOP,),
                        pad_id=PAD, mesh=make_mesh((8, 1, 1)), device_memory=6 * row)  # fmt: skip
    assert frac.prepare(state, p).rows(96) == (3 * 8, True) and frac.plans[p].budget == 3 * row


# ----------------------------------------------------------------------------- the decode copy


def _collectives(hlo: str, min_elements: int) -> list[str]:
    out = []
    for m in re.finditer(r"= (\w+)\[([\d,]*)\]\S* (all-gather|all-reduce|all-to-all|collective-permute)\(", hlo):
        if np.prod([int(x) for x in m.group(2).split(",") if x]) >= min_elements:
            out.append(f"{m.group(3)} {m.group(1)}[{m.group(2)}]")
    return out


@pytest.mark.slow  # samplers on two layouts: slow set (CI runs it)
def test_decode_layout_on_an_fsdp_mesh(split, reference):
    """Mesh (1, 8, 1) (FSDP over 8), decode_tensor_parallel=2: rollouts equal the single-device
    ones (plain and refill); the compiled sampler's arguments are the tensor-parallel copy, with no
    collective of a parameter's size (the sampler compiled on the FSDP parameters themselves
    all-gathers them: the full fp32 model on every device); the copy program's temporaries stay
    well below the model."""
    mesh = make_mesh((1, 8, 1))
    graphdef, state = nnx.split(shard_model(Transformer(TINY, rngs=nnx.Rngs(0)), mesh))
    for slots in (0, 4):
        got, sampler = run(graphdef, state, dataclasses.replace(SAMPLED, slots=slots, decode_tensor_parallel=2),
                           mesh=mesh)  # fmt: skip
        assert_same(got, reference)
    layout = sampler.layout
    assert (layout.tensor_parallel, layout.groups, dict(layout.mesh.shape)) == (2, 4, {"data": 4, "fsdp": 1, "tensor": 2})
    copy = sampler.decode_weights(state).params
    wq = copy["wq"][...]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None) and wq.sharding.mesh == layout.mesh

    biggest = max(x.size for x in jax.tree.leaves(state))
    p = PROMPTS_NP.shape[1]
    # prompts, lengths, rng; no row ids, no forced stops
    args = (jnp.zeros((4, p), jnp.int32), jnp.full((4,), p, jnp.int32), jax.random.key(0), None, None)
    new = sampler._jitted.lower(copy, *args, p_out=p).compile()
    # As before the decode layout: the program compiled on the training mesh and the FSDP masters.
    before = make_sampler(graphdef, dataclasses.replace(SAMPLED, decode_tensor_parallel=1), group_size=G,
                          stop_ids=(STOP,), pad_id=PAD, mesh=mesh)  # fmt: skip
    before.prepare(state, p)
    before.mesh = mesh
    old = before._jitted.lower(state, *args, p_out=p).compile()
    assert not _collectives(new.as_text(), biggest // 2)
    assert any(c.startswith("all-gather") for c in _collectives(old.as_text(), biggest // 2))
    full = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert new.memory_analysis().argument_size_in_bytes < 0.6 * full <= old.memory_analysis().argument_size_in_bytes * 8
    assert copy_bytes_per_device(state, layout.mesh, "float32") == sampler.plans[p].copy_bytes < 0.6 * full
    # The copy moves layer by layer: its transient is well below the model (all at once it was ~1x).
    copy_temp = layout.lower(state).compile().memory_analysis().temp_size_in_bytes
    assert copy_temp < full / 2


def test_decode_copy_dtype_identity_and_auto_group():
    """bf16 compute: the copy is bf16 (fp32 masters untouched); fp32 on one device: no copy at all.
    Auto tensor parallelism: the smallest group whose copy fits 1/8 of the memory."""
    bf16 = dataclasses.replace(TINY, compute_dtype="bfloat16")
    state = nnx.state(Transformer(bf16, rngs=nnx.Rngs(0)))
    layout = DecodeLayout(None, 1, "bfloat16")
    copy = layout.copy(state).params
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(copy))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state)) and layout.copies == 1
    np.testing.assert_array_equal(np.asarray(copy["wq"][...], np.float32),
                                  np.asarray(state["wq"][...].astype(jnp.bfloat16), np.float32))  # fmt: skip
    fp32 = nnx.state(Transformer(TINY, rngs=nnx.Rngs(0)))
    same = DecodeLayout(None, 1, "float32")
    assert same.copy(fp32).params is fp32 and same.copies == 0 and not same.needs_copy(fp32)

    mesh = make_mesh((1, 8, 1))
    one = copy_bytes_per_device(fp32, DecodeLayout(mesh, 1, "bfloat16").mesh, "bfloat16")
    two = copy_bytes_per_device(fp32, DecodeLayout(mesh, 2, "bfloat16").mesh, "bfloat16")
    assert two < one
    assert auto_tensor_parallel(fp32, mesh, "bfloat16", 8 * one) == 1
    assert auto_tensor_parallel(fp32, mesh, "bfloat16", 8 * two) == 2
    assert auto_tensor_parallel(fp32, mesh, "bfloat16", None) == 1  # memory unknown (CPU)
    with pytest.raises(ValueError, match=r"sampling.decode_tensor_parallel=3 must divide the number of devices \(8\)"):
        make_sampler(nnx.graphdef(Transformer(TINY, rngs=nnx.Rngs(0))), dataclasses.replace(SAMPLED, decode_tensor_parallel=3),
                     group_size=G, stop_ids=(STOP,), pad_id=PAD, mesh=mesh).prepare(fp32, 6)  # fmt: skip


# ----------------------------------------------------------------------------- start-up


def test_setup_logs_the_sampler_plans_and_fails_early_on_a_bad_budget(tmp_path):
    """build_setup resolves both samplers' plans at start-up and logs them; a fraction on CPU (no
    memory size) or both slots and a budget fail there with the key."""
    from echorl_jax import config as config_lib
    from echorl_jax.trainer.setup import build_setup
    from tests.test_train import tiny_cfg

    # tiny_test: 2 layers x 2 kv heads x 8, fp32, P 8 + T 28 (32 columns): 10,240 bytes per row.
    lines: list[str] = []
    build_setup(tiny_cfg(tmp_path, sampling={"kv_cache_memory": 10240.0 + 100}), log=lines.append)
    plans = [x for x in lines if "rollouts decode in" in x]
    assert plans[0].startswith("sampler: 16 rollouts decode in 8 slots with refill (sampling.kv_cache_memory budget")
    assert plans[1].startswith("held-out sampler: 16 rollouts decode in 8 slots with refill")
    with pytest.raises(config_lib.ConfigError, match="sampling.kv_cache_memory=0.5 is a fraction.*in bytes"):
        build_setup(tiny_cfg(tmp_path, sampling={"kv_cache_memory": 0.5}), log=lambda _: None)
    with pytest.raises(config_lib.ConfigError, match="sampling.kv_cache_memory=.* and sampling.slots=4 are both set"):
        tiny_cfg(tmp_path, sampling={"kv_cache_memory": 1e9, "slots": 4})
