"""EchoClip selection vs a slow pure-Python reference; echo loss; EchoRL gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from echorl_jax.rl import echo as E, objectives as O
from echorl_jax.rl.echo import EchoConfig
from echorl_jax.rl.objectives import LossBatch, ObjectiveConfig

N, G, T = 3, 3, 10
DELIMS = (1, 4)
DELIM_IDS = jnp.array([4, -1, 1], jnp.int32)  # unsorted, with a padding id


def ref_echo_clips(tokens, lengths, ent, reward, delims, cfg):
    """One Python loop per group: split steps, pool candidates, pick best."""
    n_groups, g_size = reward.shape
    clip = np.zeros(tokens.shape, bool)
    chosen = []  # (b, step_mean, end)
    for n in range(n_groups):
        ok = [reward[n, g] >= cfg.success_threshold for g in range(g_size)]
        if not (all(ok) if cfg.eligible == "all_success" else any(ok)):
            continue
        cands = []  # (-mean, g, k, end)
        for g in range(g_size):
            b = n * g_size + g
            if not ok[g]:
                continue
            steps, start = [], 0
            for t in range(lengths[b]):
                if int(tokens[b, t]) in delims or t == lengths[b] - 1:
                    steps.append((start, t))
                    start = t + 1
            for k, (s, e) in enumerate(steps):
                if e - s + 1 >= cfg.min_step_len:
                    mean = sum(float(x) for x in ent[b, s : e + 1]) / (e - s + 1)
                    cands.append((-mean, g, k, e))
        used = set()
        for neg_mean, g, _, e in sorted(cands):  # best score, then lowest row, then earliest step
            if g in used or len(used) == cfg.top_k:
                continue
            used.add(g)
            b = n * g_size + g
            clip[b, : e + 1] = True
            chosen.append((b, -neg_mean, e))
    return clip, chosen


@functools.partial(jax.jit, static_argnames="cfg")
def jit_clips(tokens, mask, ent, reward, delims, cfg):
    return E.echo_clips(tokens, mask, ent, reward, delims, cfg)


def run_both(tokens, lengths, ent, reward, cfg):
    mask = np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]
    got = jit_clips(jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), jnp.asarray(ent, jnp.float32),
                    jnp.asarray(reward, jnp.float32), DELIM_IDS, cfg)
    want, chosen = ref_echo_clips(tokens, lengths, np.asarray(ent, np.float32), reward, DELIMS, cfg)
    return got, want, chosen, mask


def arrays(elements, shape):
    return st.lists(elements, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))).map(
        lambda xs: np.array(xs).reshape(shape)
    )


CFGS = [EchoConfig(), EchoConfig(eligible="any_success", top_k=2), EchoConfig(min_step_len=3),
        EchoConfig(top_k=3, min_step_len=2, success_threshold=0.5)]


@settings(max_examples=80, deadline=None)
@given(
    tokens=arrays(st.integers(0, 5), (N * G, T)),
    lengths=arrays(st.sampled_from([0, 1, 2, 5, 9, T, T, T]), (N * G,)),
    # Dyadic entropies: exact in float32, and many exact ties.
    ent=arrays(st.integers(0, 8).map(lambda k: k / 4), (N * G, T)),
    reward=arrays(st.sampled_from([0.0, 0.5, 1.0, 1.0, 1.0]), (N, G)),
    cfg=st.sampled_from(CFGS),
)
def test_echo_clips_matches_python_reference(tokens, lengths, ent, reward, cfg):
    got, want, chosen, mask = run_both(tokens, lengths, ent, reward, cfg)
    np.testing.assert_array_equal(np.asarray(got.mask_bt), want)
    m = got.metrics
    assert float(m["num_clips"]) == len(chosen)
    if chosen:
        np.testing.assert_allclose(m["mean_clip_len"], np.mean([e + 1 for _, _, e in chosen]), rtol=1e-6)
        np.testing.assert_allclose(m["mean_clip_step_entropy"], np.mean([h for _, h, _ in chosen]), rtol=1e-6)
        rel = np.mean([(e + 1) / lengths[b] for b, _, e in chosen])
        np.testing.assert_allclose(m["mean_clip_rel_pos"], rel, rtol=1e-6)
    ok = reward >= cfg.success_threshold
    np.testing.assert_allclose(m["frac_all_success"], ok.all(1).mean())
    np.testing.assert_allclose(m["frac_all_fail"], (~ok.any(1)).mean())
    np.testing.assert_allclose(m["frac_mixed"], (ok.any(1) & ~ok.all(1)).mean())


def test_echo_clips_continuous_entropies():
    rng = np.random.default_rng(0)
    for _ in range(5):
        tokens = rng.integers(0, 6, size=(N * G, T))
        lengths = rng.integers(0, T + 1, size=N * G)
        ent = rng.gamma(2.0, 1.0, size=(N * G, T))
        reward = (rng.uniform(size=(N, G)) < 0.8).astype(np.float32)
        got, want, _, _ = run_both(tokens, lengths, ent, reward, EchoConfig())
        np.testing.assert_array_equal(np.asarray(got.mask_bt), want)


# ----------------------------------------------------------------------------- edge cases, by hand


def clips_for(rows, reward=(1.0, 1.0, 1.0), cfg=EchoConfig()):
    """rows: per rollout (tokens, entropies) of group 0; groups 1, 2 are all-fail."""
    tokens = np.full((N * G, T), 2)
    ent = np.zeros((N * G, T))
    lengths = np.zeros(N * G, int)
    for g, (tk, h) in enumerate(rows):
        tokens[g, : len(tk)] = tk
        ent[g, : len(h)] = h
        lengths[g] = len(tk)
    reward_ng = np.zeros((N, G), np.float32)
    reward_ng[0] = reward
    got, want, _, _ = run_both(tokens, lengths, ent, reward_ng, cfg)
    np.testing.assert_array_equal(np.asarray(got.mask_bt), want)
    return np.asarray(got.mask_bt)[:G].astype(int)


def test_tie_between_rows_goes_to_lowest_row_then_earliest_step():
    # Row 0: steps [0,1] mean 1, [2,3] mean 1 (tie within row); row 1: one step mean 1.
    m = clips_for([([2, 1, 2, 1], [1, 1, 1, 1]), ([2, 2, 2], [1, 1, 1]), ([2], [0.5])])
    np.testing.assert_array_equal(m[:, :4], [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_clip_is_prefix_through_best_step():
    m = clips_for([([2, 1, 2, 2, 1, 2], [0, 0, 3, 3, 3, 0]), ([2, 1], [1, 1]), ([4], [2.5])])
    np.testing.assert_array_equal(m[0, :6], [1, 1, 1, 1, 1, 0])
    assert m[1:].sum() == 0


def test_no_delimiter_is_one_step_and_truncated_row_ends_at_T_minus_1():
    m = clips_for([([2] * T, [2.0] * T), ([2, 2], [1.0, 1.0]), ([], [])])
    np.testing.assert_array_equal(m[0], [1] * T)
    assert m[1:].sum() == 0


def test_empty_responses_never_chosen_and_no_step_means_no_clip():
    assert clips_for([([], []), ([], []), ([], [])]).sum() == 0
    m = clips_for([([], []), ([3], [0.0]), ([], [])])
    np.testing.assert_array_equal(m[1, :2], [1, 0])


def test_min_step_len_and_failed_group():
    cfg = EchoConfig(min_step_len=3)
    m = clips_for([([1], [9.0]), ([2, 2, 1, 4], [0, 0, 0, 9]), ([2, 2, 2], [1, 1, 1])], cfg=cfg)
    np.testing.assert_array_equal(m.sum(1), [0, 0, 3])  # short high-entropy steps are skipped
    assert clips_for([([2, 2], [1, 1])] * 3, reward=(1.0, 0.0, 1.0)).sum() == 0  # mixed: not eligible
    m = clips_for([([2, 2], [1, 1]), ([2, 2], [5, 5]), ([2], [2])], reward=(1.0, 0.0, 1.0),
                  cfg=EchoConfig(eligible="any_success"))
    np.testing.assert_array_equal(m.sum(1), [0, 0, 1])  # failed rollout's steps are not pooled


def test_equal_non_binary_group_follows_success_threshold():
    """Equal rewards of 0.9: zero advantage (any estimator); at the default threshold 1.0 every
    rollout failed, so the group is all-fail and gets no clip; with success_threshold=0.9 it
    is all-success (compared in float32, so 0.9 passes 0.9) and gets one clip."""
    rows = [([2, 1, 2], [1, 2, 1]), ([2, 2], [1, 1]), ([2], [0.5])]
    assert clips_for(rows, reward=(0.9,) * 3).sum() == 0
    m = clips_for(rows, reward=(0.9,) * 3, cfg=EchoConfig(success_threshold=0.9))
    np.testing.assert_array_equal(m.sum(1), [2, 0, 0])  # row 0's first step (mean entropy 1.5)
    reward = jnp.full((1, 7), 0.9, jnp.float32)
    for threshold, want in ((1.0, (False, True)), (0.9, (True, False)), (np.float64(0.9), (True, False))):
        _, all_success, all_fail = E.group_outcomes(reward, threshold)
        assert (bool(all_success[0]), bool(all_fail[0])) == want, threshold
    for estimator in O.ESTIMATORS:
        adv = O.compute_advantages(reward, jnp.ones((7, 4), bool), ObjectiveConfig(estimator=estimator))
        assert np.all(np.asarray(adv) == 0.0)


def test_long_row_step_entropy_is_step_local():
    # Large entropies early would swamp a global prefix sum in float32.
    B, TT = 2, 1024
    tokens = np.full((B, TT), 2)
    tokens[:, 1000] = 1
    ent = np.full((B, TT), 1000.0, np.float32)
    ent[:, 1001:] = 0.1
    ent[1, 1001:] = 0.1 + 1e-4
    mask = np.ones((B, TT), bool)
    stats = jax.jit(lambda tk, h, m: E.step_stats(h, m, E.step_ends(tk, m, DELIM_IDS)))
    mean_bt, len_bt = stats(jnp.asarray(tokens, jnp.int32), jnp.asarray(ent), jnp.asarray(mask))
    assert int(len_bt[0, -1]) == TT - 1001
    np.testing.assert_allclose(mean_bt[:, -1], [0.1, 0.1001], rtol=1e-6)


# ----------------------------------------------------------------------------- delimiters


class FakeTokenizer:
    vocab = ["a", "\n", "b\n", "<eos>", "\n\n", " c"]
    all_special_ids = [3]

    def __len__(self):
        return len(self.vocab)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_discover_delimiters_fake_and_hf():
    assert E.discover_delimiters(FakeTokenizer()) == [1, 2, 4]
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["x = 1\ny = 2\n\nso x + y = 3.\n"] * 20, trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    hf.add_tokens(["done.\n"])
    found = E.discover_delimiters(hf)
    want = [i for i in range(len(hf)) if i != hf.eos_token_id and "\n" in hf.decode([i])]
    assert found == want
    assert hf.convert_tokens_to_ids("Ċ") in found and len(hf) - 1 in found  # byte-level newline, added token


# ----------------------------------------------------------------------------- echo loss and the point of EchoRL


def test_echo_loss_reference():
    logp = -np.arange(1, 13, dtype=np.float32).reshape(3, 4) / 10
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    got = E.echo_loss(jnp.asarray(logp), jnp.asarray(mask), jnp.float32(2.0))
    np.testing.assert_allclose(got, ((0.1 + 0.2) / 2 + (0.9 + 1.0 + 1.1 + 1.2) / 4) / 2, rtol=1e-6)
    assert float(E.echo_loss(jnp.asarray(logp), jnp.zeros((3, 4), bool), jnp.float32(0.0))) == 0.0


V = 6


def bigram_logp(params, prev_bt, tokens_bt):
    """Toy policy: log softmax(W[prev] + b)[token]."""
    logits_btv = params["w"][prev_bt] + params["b"]
    return jnp.take_along_axis(jax.nn.log_softmax(logits_btv), tokens_bt[..., None], axis=-1)[..., 0]


def test_all_success_batch_grpo_grad_zero_echo_grad_is_lambda_nll_grad():
    rng = np.random.default_rng(0)
    B = N * G
    tokens = rng.integers(0, V, size=(B, T))
    prev = np.concatenate([np.full((B, 1), 5), tokens[:, :-1]], axis=1)
    lengths = rng.integers(1, T + 1, size=B)
    mask = np.arange(T)[None] < lengths[:, None]
    reward = np.ones((N, G), np.float32)
    params = {"w": jnp.asarray(rng.normal(size=(V, V)), jnp.float32), "b": jnp.zeros(V)}
    logp0 = bigram_logp(params, prev, tokens)
    ent = rng.uniform(0, 2, size=(B, T)).astype(np.float32)
    clips = jit_clips(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(ent), jnp.asarray(reward), DELIM_IDS,
                      EchoConfig())
    assert float(clips.metrics["num_clips"]) == N
    obj = ObjectiveConfig()
    adv = O.compute_advantages(jnp.asarray(reward), jnp.asarray(mask), obj)
    batch = LossBatch(jnp.asarray(mask), adv, logp0, logp0, clips.mask_bt)
    counts = O.global_counts(batch.mask_bt, batch.echo_mask_bt)

    def loss_fn(p, echo_cfg):
        return O.total_loss(bigram_logp(p, prev, tokens), jnp.asarray(ent), batch, counts, obj, echo_cfg)[0]

    grad_fn = jax.jit(jax.grad(loss_fn), static_argnums=1)
    g_rl = grad_fn(params, EchoConfig(enabled=False))
    assert all(np.all(np.asarray(x) == 0.0) for x in jax.tree.leaves(g_rl))
    lam = 0.001
    g_echo = grad_fn(params, EchoConfig(coef=lam))

    # Reference: NLL over the reference clips only, computed without rl/echo.py.
    want_clip, _ = ref_echo_clips(tokens, lengths, ent, reward, DELIMS, EchoConfig())

    rows = np.flatnonzero(want_clip.any(1))

    def clip_nll(p):  # mean over clips of the clip's mean NLL, clipped rows only
        lp = bigram_logp(p, prev[rows], tokens[rows])
        return jnp.mean(-(lp * want_clip[rows]).sum(1) / want_clip[rows].sum(1))

    g_ref = jax.jit(jax.grad(clip_nll))(params)
    for k in params:
        assert np.abs(np.asarray(g_echo[k])).sum() > 0
        np.testing.assert_allclose(g_echo[k], lam * np.asarray(g_ref[k]), rtol=1e-5, atol=1e-9)


def test_validate():
    for field, value in [("eligible", "some"), ("coef", -1.0), ("min_step_len", 0), ("top_k", 0)]:
        with pytest.raises(ValueError, match=f"echo.{field}="):
            EchoConfig(**{field: value}).validate()
