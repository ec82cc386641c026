"""Slot refill (continuous batching), prompt bucketing and the sort-free nucleus: each must give
the same rollouts as the plain one-row-per-rollout sampler (the reference), rollout by rollout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echorl_jax.models.config import ModelConfig
from echorl_jax.models.transformer import Transformer, logp_and_entropy, positions_from_valid
from echorl_jax.sampling.draw import choose_tokens
from echorl_jax.sampling.sampler import (
    Rollout,
    SamplingConfig,
    decode_rows,
    kv_bytes_per_slot,
    make_sampler,
    prompt_bucket,
)
from echorl_jax.sharding import make_mesh, shard_model

TINY = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   init_std=0.3)  # fmt: skip
T, PAD, STOP, G = 8, 0, 39, 3
PROMPTS_NP = np.array(
    [[5, 9, 13, 2, 7, 30], [PAD, PAD, PAD, 11, 4, 19], [PAD] * 5 + [23], [PAD, 40, 3, 3, 17, 8]], np.int32
)
LENGTHS_N = np.array([6, 3, 1, 5], np.int32)
GREEDY = SamplingConfig(greedy=True, max_new_tokens=T)
SAMPLED = SamplingConfig(temperature=0.7, top_k=8, top_p=0.95, max_new_tokens=T)
# Forced stop lengths per rollout (B = 12): short, long and never (> T), so slots free up at mixed steps.
STOP_AT = np.array([1, 8, 3, 9, 2, 2, 5, 9, 1, 4, 7, 3], np.int32)


@pytest.fixture(scope="module")
def split():
    return nnx.split(Transformer(TINY, rngs=nnx.Rngs(0)))


def run(graphdef, state, cfg, *, mesh=None, stop_at=STOP_AT, seed=1, prompts=PROMPTS_NP, lengths=LENGTHS_N):
    sampler = make_sampler(graphdef, cfg, group_size=G, stop_ids=(STOP,), pad_id=PAD, mesh=mesh)
    r = sampler(state, prompts, lengths, jax.random.key(seed), bench_stop_lengths=stop_at)
    return Rollout(*(np.asarray(x) for x in r)), sampler


def assert_same(a: Rollout, b: Rollout):
    for name in ("tokens", "valid", "response_mask", "lengths", "truncated", "stop_len"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_allclose(a.behaviour_logp, b.behaviour_logp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(a.entropy, b.entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("slots", [1, 5])
def test_refill_equals_plain(split, cfg, slots):
    graphdef, state = split
    plain, _ = run(graphdef, state, cfg)
    refill, sampler = run(graphdef, state, dataclasses.replace(cfg, slots=slots))
    assert decode_rows(sampler.cfg, 12) == (slots, True)
    assert_same(refill, plain)
    lengths = plain.lengths
    assert len(set(lengths.tolist())) >= 4 and plain.truncated.any() and (~plain.truncated).any()
    # Fewer rows decode for longer, and every iteration of a busy slot draws a token.
    steps = int(sampler.last_decode_steps)
    assert lengths.sum() / slots <= steps < lengths.sum() / slots + T + 1


def test_refill_logp_entropy_match_teacher_forced_forward(split):
    graphdef, state = split
    r, _ = run(graphdef, state, dataclasses.replace(SAMPLED, slots=5), stop_at=None)
    p = PROMPTS_NP.shape[1]
    fwd = jax.jit(lambda s, tok, val: nnx.merge(graphdef, s)(tok, positions_from_valid(val), val)[0])
    logits = fwd(state, r.tokens, r.valid)
    logp, ent = logp_and_entropy(logits[:, p - 1 : p + T - 1], jnp.asarray(r.tokens[:, p:]), SAMPLED.temperature)
    m = r.response_mask
    assert (~m).any() and m.sum(1).max() > 3, "want early stops (token 39) and long rows"
    np.testing.assert_allclose(r.behaviour_logp[m], np.asarray(logp)[m], atol=1e-4)
    np.testing.assert_allclose(r.entropy[m], np.asarray(ent)[m], atol=1e-4)
    assert (r.behaviour_logp[~m] == 0).all() and (r.entropy[~m] == 0).all() and (r.tokens[:, p:][~m] == PAD).all()


@pytest.mark.parametrize("mesh_shape,slots", [((8, 1, 1), 8), ((2, 2, 2), 4)])
def test_refill_on_mesh_equals_single_device_plain(split, mesh_shape, slots):
    graphdef, state = split
    mesh = make_mesh(mesh_shape)
    m_graphdef, m_state = nnx.split(shard_model(Transformer(TINY, rngs=nnx.Rngs(0)), mesh))
    for cfg in (GREEDY, SAMPLED):
        plain, _ = run(graphdef, state, cfg)
        refill, sampler = run(m_graphdef, m_state, dataclasses.replace(cfg, slots=slots), mesh=mesh)
        assert decode_rows(sampler.cfg, 12, 8 if mesh_shape == (8, 1, 1) else 4)[1]
        assert_same(refill, plain)


@pytest.mark.slow  # a sampler compile per bucket, 11 s; CI's slow set runs it
def test_prompt_bucketing_gives_the_same_rollouts(split):
    graphdef, state = split
    wide = np.concatenate([np.full((4, 34), PAD, np.int32), PROMPTS_NP], axis=1)  # P = 40, longest prompt 6
    a, sampler = run(graphdef, state, SAMPLED, prompts=wide)
    b, _ = run(graphdef, state, dataclasses.replace(SAMPLED, prompt_buckets=False), prompts=wide)
    assert_same(a, b)
    assert a.tokens.shape == (12, 40 + T)
    c, _ = run(graphdef, state, dataclasses.replace(SAMPLED, slots=5), prompts=wide)
    assert_same(c, b)
    # One program per bucket: longer prompts within the width-16 bucket reuse it, a 17-token one compiles width 32.
    before = sampler.traces
    longer = wide.copy()
    longer[0, -16:] = 7
    sampler(state, longer, np.array([16, 3, 1, 5], np.int32), jax.random.key(0), bench_stop_lengths=STOP_AT)
    assert sampler.traces == before
    longer[0, -17:] = 7
    sampler(state, longer, np.array([17, 3, 1, 5], np.int32), jax.random.key(0), bench_stop_lengths=STOP_AT)
    assert sampler.traces == before + 1


def _rows_of(prompts) -> np.ndarray:
    """Group-major rollout ids of prompts ``prompts`` in a batch of all four: n·G + g."""
    return (np.asarray(prompts)[:, None] * G + np.arange(G)).reshape(-1)


@pytest.mark.parametrize("slots", [0, 5], ids=["plain", "refill"])
def test_row_ids_key_each_rollout(split, slots):
    """Rollout r draws from the stream of ``row_ids[r]``, not of its row: the default ids are the row index,
    and prompts permuted, or split over two batches, with their rollouts' ids give the same rollouts."""
    graphdef, state = split
    base, sampler = run(graphdef, state, dataclasses.replace(SAMPLED, slots=slots))  # default ids, seed 1

    def sample(prompts, ids):
        r = sampler(state, PROMPTS_NP[prompts], LENGTHS_N[prompts], jax.random.key(1), row_ids=ids,
                    bench_stop_lengths=STOP_AT[_rows_of(prompts)])  # fmt: skip
        return Rollout(*(np.asarray(x) for x in r))

    def take(r: Rollout, rows) -> Rollout:
        return Rollout(*(x[rows] for x in r))

    assert_same(sample(np.arange(4), np.arange(4 * G)), base)
    traces = sampler.traces
    perm = np.array([2, 0, 3, 1])
    assert_same(sample(perm, _rows_of(perm)), take(base, _rows_of(perm)))
    assert sampler.traces == traces  # the ids are a traced input: new ids, same program
    assert (sample(perm, None).tokens != take(base, _rows_of(perm)).tokens).any()  # row streams: other draws
    halves = [sample(h, _rows_of(h)) for h in ([3, 1], [0, 2])]  # B = 6: refill still has 5 slots
    assert_same(Rollout(*(np.concatenate(x) for x in zip(*halves))), take(base, _rows_of([3, 1, 0, 2])))


def test_bucket_and_slot_arithmetic():
    assert [prompt_bucket(n, 2048) for n in (1, 16, 17, 33, 600, 1024, 1025, 2048)] == \
        [16, 16, 32, 64, 1024, 1024, 2048, 2048]  # fmt: skip
    assert prompt_bucket(70, 100) == 100 and prompt_bucket(3, 6) == 6
    cfg = SamplingConfig()
    assert decode_rows(cfg, 12, 8) == (16, False)
    assert decode_rows(dataclasses.replace(cfg, slots=5), 12, 4) == (8, True)
    assert decode_rows(dataclasses.replace(cfg, slots=12), 12, 1) == (12, False)
    # Qwen2.5-1.5B: 28 layers, 2 kv heads of 128, bf16; P 2048 + T 8192.
    qwen15 = ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, compute_dtype="bfloat16")  # fmt: skip
    assert kv_bytes_per_slot(qwen15, 2048, 8192) == 2 * 28 * 2 * 128 * 10240 * 2
    with pytest.raises(ValueError, match="sampling.slots="):
        SamplingConfig(slots=-1).validate()


@pytest.mark.parametrize("temperature", [1.0, 30.0], ids=["peaked", "flat"])
def test_nucleus_from_top_candidates_equals_full_sort(temperature):
    """top-p alone: the draw among the top candidates (peaked) and the full-sort fallback (flat,
    the nucleus does not fit) both equal the draw over the whole sorted vocabulary."""
    v, rows = 300, 64
    logits = jax.random.normal(jax.random.key(0), (rows, v)) * 4.0
    keys = jax.random.split(jax.random.key(1), rows)
    cfg = SamplingConfig(temperature=temperature, top_p=0.9)
    full = np.asarray(choose_tokens(logits, keys, cfg, top_p_candidates=v)[0])
    few = np.asarray(choose_tokens(logits, keys, cfg, top_p_candidates=32)[0])
    np.testing.assert_array_equal(few, full)
    assert len(set(full.tolist())) > 8
