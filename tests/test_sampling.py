"""Sampler: greedy vs a no-cache loop, log-probs vs a teacher-forced forward,
sampling distributions vs softmax, stop handling, meshes, compile-once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from echorl_jax.models.config import ModelConfig
from echorl_jax.models.transformer import Transformer, logp_and_entropy, positions_from_valid
from echorl_jax.sampling.config import SamplingConfig
from echorl_jax.sampling.sampler import Rollout, decode_responses, generate_text, make_sampler
from echorl_jax.sharding import make_mesh, shard_model

# init_std 0.3 spreads the logits (std ~1.7), so greedy margins dwarf fp32 noise.
TINY = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   init_std=0.3)  # fmt: skip
T = 8
PAD = 0
PROMPTS_NP = np.array(
    [[5, 9, 13, 2, 7, 30], [PAD, PAD, PAD, 11, 4, 19], [PAD] * 5 + [23], [PAD, 40, 3, 3, 17, 8]], np.int32
)
LENGTHS_N = np.array([6, 3, 1, 5], np.int32)
SAMPLED = SamplingConfig(temperature=0.7, top_k=8, top_p=0.95, max_new_tokens=T)
STOP = 39  # for the sampled config: some rows stop early, others never


@pytest.fixture(scope="module")
def split():
    return nnx.split(Transformer(TINY, rngs=nnx.Rngs(0)))


def forward_fn(graphdef):
    return jax.jit(lambda state, tok, val: nnx.merge(graphdef, state)(tok, positions_from_valid(val), val)[0])


@pytest.fixture(scope="module")
def greedy(split):
    graphdef, state = split
    sampler = make_sampler(graphdef, SamplingConfig(greedy=True, max_new_tokens=T), group_size=1, stop_ids=(),
                           pad_id=PAD)  # fmt: skip
    return sampler, sampler(state, PROMPTS_NP, LENGTHS_N, jax.random.key(0))


@pytest.fixture(scope="module")
def sampled(split):
    graphdef, state = split
    sampler = make_sampler(graphdef, SAMPLED, group_size=3, stop_ids=(STOP,), pad_id=PAD)
    return sampler, sampler(state, PROMPTS_NP, LENGTHS_N, jax.random.key(1))


def np_(rollout: Rollout) -> Rollout:
    return Rollout(*(np.asarray(x) for x in rollout))


def test_config_validation():
    SamplingConfig().validate()
    for bad, key in [(dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                     (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"sampling.{key}="):
            SamplingConfig(**bad).validate()


def test_greedy_matches_no_cache_reference(split, greedy):
    graphdef, state = split
    r = np_(greedy[1])
    fwd = forward_fn(graphdef)
    n, p = PROMPTS_NP.shape
    tok = np.zeros((n, p + T), np.int32)
    val = np.zeros((n, p + T), bool)
    tok[:, :p] = PROMPTS_NP
    val[:, :p] = np.arange(p)[None] >= (p - LENGTHS_N)[:, None]
    for t in range(T):  # full forward over the growing sequence, argmax at the newest position
        logits = np.asarray(fwd(state, tok, val))[:, p - 1 + t]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-3, "near-tie: reference would be ambiguous"
        tok[:, p + t] = logits.argmax(-1)
        val[:, p + t] = True
    np.testing.assert_array_equal(r.tokens[:, p:], tok[:, p:])
    np.testing.assert_array_equal(r.valid, val)
    assert r.response_mask.all() and (r.lengths == T).all() and r.truncated.all()
    np.testing.assert_array_equal(r.tokens[:, :p], np.where(val[:, :p], PROMPTS_NP, PAD))


@pytest.mark.parametrize("which", ["sampled", "greedy"])
def test_logp_entropy_match_teacher_forced_forward(split, greedy, sampled, which):
    graphdef, state = split
    r = np_(sampled[1] if which == "sampled" else greedy[1])
    temperature = SAMPLED.temperature if which == "sampled" else 1.0  # greedy reports temperature 1
    p = PROMPTS_NP.shape[1]
    logits = forward_fn(graphdef)(state, r.tokens, r.valid)
    # Full-vocabulary distribution: top-k / top-p are not folded into behaviour_logp.
    logp, ent = logp_and_entropy(logits[:, p - 1 : p + T - 1], jnp.asarray(r.tokens[:, p:]), temperature)
    m = r.response_mask
    np.testing.assert_allclose(r.behaviour_logp[m], np.asarray(logp)[m], atol=1e-4)
    np.testing.assert_allclose(r.entropy[m], np.asarray(ent)[m], atol=1e-4)
    assert (r.behaviour_logp[~m] == 0).all() and (r.entropy[~m] == 0).all()
    if which == "sampled":
        assert (~m).any() and m[:, 1:].any(), "want rows that stop early and rows that continue"


def _chi2_pvalue(counts, probs):
    """Pearson chi-square p-value; bins expecting < 5 draws are pooled."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return stats.chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue


@pytest.mark.parametrize("cfg", [SamplingConfig(temperature=0.7, max_new_tokens=1),
                                 SamplingConfig(top_p=0.6, max_new_tokens=1),
                                 SamplingConfig(temperature=1.3, top_k=4, max_new_tokens=1)], ids=str)  # fmt: skip
def test_sampling_distribution(split, cfg):
    graphdef, state = split
    draws = 4000
    sampler = make_sampler(graphdef, cfg, group_size=draws, stop_ids=(), pad_id=PAD)
    r = np_(sampler(state, PROMPTS_NP[:1], LENGTHS_N[:1], jax.random.key(7)))
    logits = np.asarray(forward_fn(graphdef)(state, PROMPTS_NP[:1], np.ones((1, 6), bool)))[0, -1].astype(np.float64)
    full = np.exp(logits / cfg.temperature - (logits / cfg.temperature).max())
    full /= full.sum()
    # Reference truncation: top-k, then the smallest top set with mass >= top_p, renormalised.
    order = np.argsort(-full)
    cand = order[: cfg.top_k] if cfg.top_k else order
    q = full[cand] / full[cand].sum()
    support = cand[(np.cumsum(q) - q) < cfg.top_p]
    ref = np.zeros_like(full)
    ref[support] = full[support]
    ref /= ref.sum()
    counts = np.bincount(r.tokens[:, -1], minlength=TINY.vocab_size)
    assert counts.sum() == draws
    assert counts[ref == 0].sum() == 0, "a token outside top-k / the nucleus was drawn"
    if cfg.top_p < 1 or cfg.top_k:
        assert 2 <= len(support) < TINY.vocab_size // 2  # the truncation really bites
    assert _chi2_pvalue(counts, ref) > 1e-3
    # The test has power: the untruncated / untempered distribution is rejected.
    wrong = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert _chi2_pvalue(counts, wrong) < 1e-6
    assert np.abs(counts / draws - ref).sum() / 2 < 0.05  # total variation


def test_left_padding_matches_prompt_alone(split, greedy):
    graphdef, state = split
    sampler, batch = greedy
    i, p = 1, PROMPTS_NP.shape[1]
    alone = np_(sampler(state, PROMPTS_NP[i : i + 1, p - LENGTHS_N[i] :], LENGTHS_N[i : i + 1], jax.random.key(0)))
    batch = np_(batch)
    np.testing.assert_array_equal(alone.tokens[0, LENGTHS_N[i] :], batch.tokens[i, p:])
    np.testing.assert_allclose(alone.behaviour_logp[0], batch.behaviour_logp[i], atol=1e-5)


def chain_model(vocab: int, hidden: int, next_token: dict[int, int]) -> Transformer:
    """A model whose argmax after token a is ``next_token.get(a, a + 1)``: blocks zeroed, one-hot embeddings."""
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_layers=1, num_heads=2,
                      num_kv_heads=1, tie_embeddings=False)  # fmt: skip
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.wo[...] = jnp.zeros_like(model.wo[...])
    model.w_down[...] = jnp.zeros_like(model.w_down[...])
    model.embed[...] = jnp.eye(vocab, hidden)
    head = np.zeros((hidden, vocab), np.float32)
    for a in range(vocab):
        head[a, next_token.get(a, (a + 1) % vocab)] = 10.0
    model.lm_head[...] = jnp.asarray(head)
    return model


@pytest.fixture(scope="module")
def chain():
    graphdef, state = nnx.split(chain_model(32, 32, {}))
    cfg = SamplingConfig(greedy=True, max_new_tokens=6)
    return state, make_sampler(graphdef, cfg, group_size=2, stop_ids=(10, 20), pad_id=PAD)


def test_stop_tokens(chain):
    state, sampler = chain
    # Next token is always a + 1; stops at 10 or 20.
    prompts = np.array([[PAD, 3, 9], [1, 2, 17], [PAD, PAD, 22], [PAD, 2, 4]], np.int32)
    r = np_(sampler(state, prompts, np.array([2, 3, 1, 2]), jax.random.key(0)))
    want_resp = np.array([[10, 0, 0, 0, 0, 0],  # stops at step 0
                          [18, 19, 20, 0, 0, 0],  # stops mid-way (second stop id)
                          [23, 24, 25, 26, 27, 28],  # never stops
                          [5, 6, 7, 8, 9, 10]])  # stops at the last step  # fmt: skip
    want_len = np.array([1, 3, 6, 6])
    want_trunc = np.array([False, False, True, False])
    g = np.repeat  # rows are group-major: both samples of prompt n are rows 2n, 2n+1
    np.testing.assert_array_equal(r.tokens[:, 3:], g(want_resp, 2, 0))
    np.testing.assert_array_equal(r.lengths, g(want_len, 2))
    np.testing.assert_array_equal(r.truncated, g(want_trunc, 2))
    np.testing.assert_array_equal(r.response_mask, np.arange(6)[None] < g(want_len, 2)[:, None])
    np.testing.assert_array_equal(r.valid[:, 3:], r.response_mask)
    np.testing.assert_array_equal(r.valid[:, :3], g(prompts != PAD, 2, 0))
    assert (r.behaviour_logp[r.response_mask] > -1e-3).all()  # the chain's argmax has probability ~1
    assert (r.behaviour_logp[~r.response_mask] == 0).all()
    assert (r.entropy[~r.response_mask] == 0).all()

    class Ids:  # a tokenizer whose text is the id list
        decode = staticmethod(lambda ids: ",".join(map(str, ids)))

    texts = decode_responses(Ids, r)[::2]  # the stop token is excluded; a truncated row keeps all T tokens
    assert texts == ["", "18,19", "23,24,25,26,27,28", "5,6,7,8,9"]


def test_early_exit_when_all_rows_stop(chain):
    state, sampler = chain
    r = np_(sampler(state, np.array([[PAD, 9], [16, 17]], np.int32), np.array([1, 2]), jax.random.key(0)))
    np.testing.assert_array_equal(r.tokens[::2, 2:], [[10, 0, 0, 0, 0, 0], [18, 19, 20, 0, 0, 0]])
    np.testing.assert_array_equal(r.lengths, [1, 1, 3, 3])
    assert not r.truncated.any()


def test_determinism_and_independent_rows(split, sampled):
    graphdef, state = split
    sampler, first = sampled
    again = np_(sampler(state, PROMPTS_NP, LENGTHS_N, jax.random.key(1)))
    other = np_(sampler(state, PROMPTS_NP, LENGTHS_N, jax.random.key(2)))
    first = np_(first)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert (first.tokens != other.tokens).any()
    resp = first.tokens[:, PROMPTS_NP.shape[1] :].reshape(len(PROMPTS_NP), 3, T)  # [N, G, T]
    distinct = [len({row.tobytes() for row in group}) for group in resp]
    assert min(distinct) >= 2, f"rows of a group should differ under sampling, distinct per group: {distinct}"


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_mesh_matches_single_device(greedy, sampled, mesh_shape):
    mesh = make_mesh(mesh_shape)
    graphdef, state = nnx.split(shard_model(Transformer(TINY, rngs=nnx.Rngs(0)), mesh))
    # N=4 prompts: not a multiple of 8 on (8, 1, 1), so the padded path runs.
    sampler = make_sampler(graphdef, greedy[0].cfg, group_size=1, stop_ids=(), pad_id=PAD, mesh=mesh)
    r = np_(sampler(state, PROMPTS_NP, LENGTHS_N, jax.random.key(0)))
    np.testing.assert_array_equal(r.tokens, np.asarray(greedy[1].tokens))
    np.testing.assert_allclose(r.behaviour_logp, np.asarray(greedy[1].behaviour_logp), atol=1e-5)
    if mesh_shape == (2, 2, 2):  # per-row RNG streams do not depend on the mesh (B=12 rows over 4 shards)
        sampler = make_sampler(graphdef, SAMPLED, group_size=3, stop_ids=(STOP,), pad_id=PAD, mesh=mesh)
        r = sampler(state, PROMPTS_NP, LENGTHS_N, jax.random.key(1))
        assert r.tokens.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(r.tokens), np.asarray(sampled[1].tokens))


def test_compiles_once_per_shape(split, greedy):
    graphdef, state = split
    sampler, _ = greedy
    before = sampler.traces
    new_state = jax.tree.map(lambda x: x * 1.01, state)  # the trainer passes updated params each step
    sampler(new_state, PROMPTS_NP[::-1].copy(), LENGTHS_N[::-1].copy(), jax.random.key(5))
    sampler(state, PROMPTS_NP, LENGTHS_N, jax.random.key(6))
    assert sampler.traces == before >= 1
    sampler(state, PROMPTS_NP[:2], LENGTHS_N[:2], jax.random.key(0))
    sampler(state, PROMPTS_NP[2:], LENGTHS_N[2:], jax.random.key(1))
    assert sampler.traces == before + 1  # one new shape, traced once


def test_rejects_bad_lengths(greedy, split):
    with pytest.raises(ValueError, match="prompt lengths"):
        greedy[0](split[1], PROMPTS_NP, np.array([6, 0, 1, 5]), jax.random.key(0))


def test_generate_text_and_decode_responses():
    from echorl_jax.tasks.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    ids = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    # Next character is the next ASCII one, except "h" -> <eos>.
    model = chain_model(len(tok), 104, {ids("h")[0]: tok.eos_token_id})
    texts = generate_text(model, tok, ["abc", "xf", "q"], SamplingConfig(greedy=True, max_new_tokens=8))
    assert texts == ["defgh", "gh", "rstuvwxy"]  # stop token excluded; truncated row keeps all 8
    texts = generate_text(model, tok, ["ef"], SamplingConfig(greedy=True, max_new_tokens=8), group_size=2)
    assert texts == ["gh", "gh"]


# ----------------------------------------------------------------------------- multi-token stop sequences


def _first_stop_reference(resp_t, stops):
    """Slow reference: (cut, stop_len) at the first position where the response ends with a stop."""
    seqs = [tuple(s) if isinstance(s, tuple) else (s,) for s in stops]
    for t in range(len(resp_t)):
        hits = [len(q) for q in seqs if t + 1 >= len(q) and tuple(resp_t[t + 1 - len(q) : t + 1]) == q]
        if hits:
            return t + 1, max(hits)
    return len(resp_t), 0


def test_multi_token_stops_match_cut_reference(split, sampled):
    """Generating with stop sequences == generating without any stop, then cutting at the first one."""
    graphdef, state = split
    p = PROMPTS_NP.shape[1]
    free = make_sampler(graphdef, SAMPLED, group_size=3, stop_ids=(), pad_id=PAD)
    ref = np_(free(state, PROMPTS_NP, LENGTHS_N, jax.random.key(1)))
    resp = ref.tokens[:, p:]
    # Stops taken from the unstopped text, so several rows hit them (row 10's is a repeated token).
    stops = (STOP, tuple(resp[0, 2:4].tolist()), tuple(resp[2, 2:5].tolist()), tuple(resp[10, 2:4].tolist()))
    r = np_(make_sampler(graphdef, SAMPLED, group_size=3, stop_ids=stops, pad_id=PAD)(
        state, PROMPTS_NP, LENGTHS_N, jax.random.key(1)))  # fmt: skip
    cuts = [_first_stop_reference(row.tolist(), stops) for row in resp]
    n_b = np.array([c for c, _ in cuts])
    assert {sl for _, sl in cuts} >= {0, 2, 3}, f"want rows stopped by 2- and 3-token stops and a free row: {cuts}"
    mask_bt = np.arange(T)[None] < n_b[:, None]
    np.testing.assert_array_equal(r.response_mask, mask_bt)
    np.testing.assert_array_equal(r.tokens[:, p:], np.where(mask_bt, resp, PAD))
    np.testing.assert_array_equal(r.tokens[:, :p], ref.tokens[:, :p])
    np.testing.assert_array_equal(r.valid[:, p:], mask_bt)
    np.testing.assert_array_equal(r.lengths, n_b)
    np.testing.assert_array_equal(r.stop_len, [sl for _, sl in cuts])
    np.testing.assert_array_equal(r.truncated, [sl == 0 for _, sl in cuts])
    np.testing.assert_allclose(r.behaviour_logp, np.where(mask_bt, ref.behaviour_logp, 0.0), atol=1e-6)
    np.testing.assert_allclose(r.entropy, np.where(mask_bt, ref.entropy, 0.0), atol=1e-6)


def test_multi_token_stop_chain_and_decode():
    graphdef, state = nnx.split(chain_model(32, 32, {}))  # next token is always a + 1
    cfg = SamplingConfig(greedy=True, max_new_tokens=6)
    # (6, 7) stops row 0; (13, 15) never completes; (14, 15, 16) overlaps the single stop 16 (longest wins).
    sampler = make_sampler(graphdef, cfg, group_size=1, stop_ids=((6, 7), (13, 15), 16, (14, 15, 16)), pad_id=PAD)
    prompts = np.array([[PAD, 4], [PAD, 12], [PAD, 20], [PAD, 5]], np.int32)
    r = np_(sampler(state, prompts, np.array([1, 1, 1, 1]), jax.random.key(0)))
    np.testing.assert_array_equal(r.tokens[:, 2:], [[5, 6, 7, 0, 0, 0], [13, 14, 15, 16, 0, 0],
                                                    [21, 22, 23, 24, 25, 26], [6, 7, 0, 0, 0, 0]])  # fmt: skip
    np.testing.assert_array_equal(r.lengths, [3, 4, 6, 2])
    np.testing.assert_array_equal(r.stop_len, [2, 3, 0, 2])
    np.testing.assert_array_equal(r.truncated, [False, False, True, False])

    class Ids:
        decode = staticmethod(lambda ids: ",".join(map(str, ids)))

    assert decode_responses(Ids, r) == ["5", "13", "21,22,23,24,25,26", ""]  # the whole stop sequence is left out


def test_stop_sequence_validation():
    with pytest.raises(ValueError, match="empty stop sequence"):
        make_sampler(nnx.graphdef(chain_model(32, 32, {})), SamplingConfig(), group_size=1, stop_ids=((),), pad_id=0)
