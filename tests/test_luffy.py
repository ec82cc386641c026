"""LUFFY (off-policy guidance): shaped expert-token loss and mixed-group advantages against numpy
references, the mixed group layout, expert data checks, and one RL step of luffy / luffy+echo."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from byo_fixture import IM_END, VOCAB_SIZE, make_bpe_tokenizer

from echorl_jax import config as config_lib
from echorl_jax.data.formats import DataError
from echorl_jax.rl import methods, objectives as O, offpolicy
from echorl_jax.rl.echo import EchoConfig
from echorl_jax.rl.objectives import LossBatch
from echorl_jax.sampling.sampler import Rollout
from echorl_jax.trainer import rollout as rollout_lib, setup as setup_lib, train
from echorl_jax.trainer.metrics_log import read_jsonl

GAMMA = 0.1

# ----------------------------------------------------------------------------- numpy references


def ref_luffy_loss(logp, old, reward, lengths, G, k, clip=0.2, gamma=GAMMA, norm_length=None):
    """LUFFY's pg loss in float64, row by row: Dr.GRPO advantage over the mixed group; PPO clip on the
    G-k sampled rows; -A * p/(p+gamma) on the k expert rows; sum / (rows * L)."""
    B, T = logp.shape
    total, rows = 0.0, 0
    for b in range(B):
        n, g = divmod(b, G)
        A = reward[n, g] - reward[n].mean()
        L = lengths[b]
        if L == 0:
            continue
        rows += 1
        for t in range(L):
            if g >= G - k:
                p = np.exp(logp[b, t])
                total += -A * p / (p + gamma)
            else:
                r = np.exp(logp[b, t] - old[b, t])
                total += max(-A * r, -A * np.clip(r, 1 - clip, 1 + clip))
    return total / (rows * (norm_length or T))


def luffy_batch(seed=0, N=2, G=4, k=1, T=5):
    rng = np.random.default_rng(seed)
    B = N * G
    lengths = rng.integers(1, T + 1, size=B)
    lengths[1] = 0  # an empty sampled row counts for nothing
    mask = np.arange(T)[None, :] < lengths[:, None]
    logp = -rng.uniform(0.05, 4.0, size=(B, T))
    old = logp + rng.normal(0, 0.3, size=(B, T))
    reward = rng.integers(0, 2, size=(N, G)).astype(np.float32)
    reward[0, -1] = 1.0  # an expert that is right, one that is checked like any rollout
    off = offpolicy.expert_rows(B, G, k)[:, None] & mask
    return dict(lengths=lengths, mask=mask, logp=logp, old=old, reward=reward, off=off, N=N, G=G, k=k, T=T)


def luffy_objective(**kw):
    return methods.get_method("luffy", max_new_tokens=5, **kw)


def loss_of(d, obj, logp=None):
    mask = jnp.asarray(d["mask"])
    adv = O.compute_advantages(jnp.asarray(d["reward"]), mask, obj)
    batch = LossBatch(mask, adv, jnp.asarray(d["old"], jnp.float32), jnp.zeros(mask.shape), jnp.zeros_like(mask),
                      jnp.asarray(d["off"]))  # fmt: skip
    counts = O.global_counts(mask, batch.echo_mask_bt, batch.offpolicy_bt)
    logp = jnp.asarray(d["logp"] if logp is None else logp, jnp.float32)
    ent = jnp.zeros(mask.shape)
    return jax.value_and_grad(O.total_loss, has_aux=True)(logp, ent, batch, counts, obj, None)


# ----------------------------------------------------------------------------- loss and advantages


def test_luffy_preset_fields():
    obj = luffy_objective()
    assert (obj.estimator, obj.policy_loss, obj.aggregation) == ("drgrpo", "ppo", "seq-mean-token-sum-norm")
    assert (obj.expert_per_group, obj.shaping_gamma, obj.kl_coef) == (1, 0.1, 0.0)


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 2)])
def test_luffy_loss_and_gradient_match_numpy(seed, k):
    d = luffy_batch(seed, k=k)
    obj = luffy_objective(entropy_coef=0.0, expert_per_group=k)
    (loss, metrics), grad = loss_of(d, obj)
    ref = ref_luffy_loss(d["logp"], d["old"], d["reward"], d["lengths"], d["G"], k)
    np.testing.assert_allclose(float(metrics["pg_loss"]), ref, rtol=1e-5, atol=1e-7)
    # Gradient: central differences of the float64 reference, token by token.
    eps, fd = 1e-5, np.zeros_like(d["logp"])
    for b, t in zip(*np.nonzero(d["mask"])):
        up, down = d["logp"].copy(), d["logp"].copy()
        up[b, t] += eps
        down[b, t] -= eps
        args = (d["old"], d["reward"], d["lengths"], d["G"], k)
        fd[b, t] = (ref_luffy_loss(up, *args) - ref_luffy_loss(down, *args)) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=2e-3, atol=1e-6)
    # Expert tokens: exactly -A * gamma * p / (p + gamma)^2 / (rows * T), unclipped whatever p.
    b, t = next((b, t) for b, t in zip(*np.nonzero(d["off"])))
    n, g = divmod(b, d["G"])
    A = d["reward"][n, g] - d["reward"][n].mean()
    p = np.exp(d["logp"][b, t])
    rows = int((d["lengths"] > 0).sum())
    np.testing.assert_allclose(grad[b, t], -A * GAMMA * p / (p + GAMMA) ** 2 / (rows * d["T"]), rtol=1e-4, atol=1e-8)
    # Off-policy tokens are never counted as clipped, their probability is reported.
    p_off = np.exp(d["logp"])[d["off"]].mean()
    np.testing.assert_allclose(float(metrics["offpolicy_prob"]), p_off, rtol=1e-5)


def test_expert_tokens_ignore_old_logp_and_never_clip():
    """The behaviour probability of an expert token is 1 by definition: old_logp there changes nothing."""
    d = luffy_batch(2)
    obj = luffy_objective()
    (_, m1), g1 = loss_of(d, obj)
    d2 = dict(d, old=np.where(d["off"], d["old"] - 30.0, d["old"]))  # a ratio far outside any clip
    (_, m2), g2 = loss_of(d2, obj)
    np.testing.assert_allclose(float(m1["pg_loss"]), float(m2["pg_loss"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-6)
    assert float(m1["clip_frac"]) == float(m2["clip_frac"])


def test_no_expert_mask_is_the_plain_objective():
    d = luffy_batch(3)
    obj = luffy_objective()
    none = dict(d, off=np.zeros_like(d["off"]))
    (_, m_zero), g_zero = loss_of(none, obj)
    mask = jnp.asarray(d["mask"])
    adv = O.compute_advantages(jnp.asarray(d["reward"]), mask, obj)
    batch = LossBatch(mask, adv, jnp.asarray(d["old"], jnp.float32), jnp.zeros(mask.shape), jnp.zeros_like(mask))
    counts = O.global_counts(mask, batch.echo_mask_bt)
    (_, m_old), g_old = jax.value_and_grad(O.total_loss, has_aux=True)(
        jnp.asarray(d["logp"], jnp.float32), jnp.zeros(mask.shape), batch, counts, obj, None)
    np.testing.assert_array_equal(np.asarray(g_zero), np.asarray(g_old))
    assert float(m_zero["pg_loss"]) == float(m_old["pg_loss"])


def test_micro_batches_sum_to_the_whole_batch_with_experts():
    d = luffy_batch(4, N=2, G=4, k=1)
    obj = luffy_objective()
    echo = EchoConfig(coef=0.5)
    mask = jnp.asarray(d["mask"])
    adv = O.compute_advantages(jnp.asarray(d["reward"]), mask, obj)
    echo_mask = mask & (jnp.arange(5)[None] < 2) & ~jnp.asarray(d["off"])
    arrays = [mask, adv, jnp.asarray(d["old"], jnp.float32), jnp.zeros(mask.shape), echo_mask, jnp.asarray(d["off"])]
    counts = O.global_counts(mask, echo_mask, arrays[-1])
    logp, ent = jnp.asarray(d["logp"], jnp.float32), jnp.ones(mask.shape)
    fn = jax.value_and_grad(O.total_loss, has_aux=True)
    (whole, wm), wg = fn(logp, ent, LossBatch(*arrays), counts, obj, echo)
    parts = [fn(logp[sl], ent[sl], LossBatch(*(a[sl] for a in arrays)), counts, obj, echo)
             for sl in (slice(0, 3), slice(3, 8))]  # fmt: skip
    np.testing.assert_allclose(sum(float(p[0][0]) for p in parts), float(whole), rtol=1e-5)
    for key in wm:
        np.testing.assert_allclose(sum(float(p[0][1][key]) for p in parts), float(wm[key]), rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(np.concatenate([p[1] for p in parts]), np.asarray(wg), rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- mixed group layout


def fake_rollout(N, Gs, P, T, seed=0):
    """``Gs`` sampled rows per prompt; the prompt of group n is [pad, 10+n, 20+n] (left-padded)."""
    rng = np.random.default_rng(seed)
    B = N * Gs
    prompt = np.stack([[0, 10 + n, 20 + n] for n in range(N) for _ in range(Gs)])[:, :P]
    resp = rng.integers(30, 40, size=(B, T))
    lengths = rng.integers(1, T + 1, size=B)
    rmask = np.arange(T)[None] < lengths[:, None]
    resp = np.where(rmask, resp, 0)
    valid = np.concatenate([prompt != 0, rmask], axis=1)
    f = lambda x: jnp.asarray(x)
    return Rollout(f(np.concatenate([prompt, resp], 1).astype(np.int32)), f(valid), f(rmask),
                   f(-rng.uniform(0, 1, (B, T)) * rmask), f(rng.uniform(0, 1, (B, T)) * rmask),
                   f(lengths.astype(np.int32)), f(lengths == T), f(np.ones(B, np.int32)))  # fmt: skip


def test_mix_expert_rows_layout():
    N, G, k, P, T = 2, 4, 2, 3, 5
    on = fake_rollout(N, G - k, P, T)
    expert_tokens = np.zeros((N, k, T), np.int32)
    expert_len = np.array([[2, 5], [3, 1]], np.int32)
    for n in range(N):
        for j in range(k):
            expert_tokens[n, j, : expert_len[n, j]] = 50 + 10 * n + j
    out = offpolicy.mix_expert_rows(on, jnp.asarray(expert_tokens), jnp.asarray(expert_len))
    assert out.tokens.shape == (N * G, P + T)
    is_expert = offpolicy.expert_rows(N * G, G, k)
    np.testing.assert_array_equal(is_expert, [False, False, True, True] * 2)
    tok, on_tok = np.asarray(out.tokens), np.asarray(on.tokens)
    for b in range(N * G):
        n, g = divmod(b, G)
        if g < G - k:  # sampled rows unchanged, in order
            src = n * (G - k) + g
            for field in Rollout._fields:
                np.testing.assert_array_equal(np.asarray(getattr(out, field))[b], np.asarray(getattr(on, field))[src])
            continue
        j = g - (G - k)
        L = expert_len[n, j]
        np.testing.assert_array_equal(tok[b, :P], on_tok[n * (G - k), :P])  # the group's prompt
        np.testing.assert_array_equal(tok[b, P:], expert_tokens[n, j])
        np.testing.assert_array_equal(np.asarray(out.response_mask)[b], np.arange(T) < L)
        np.testing.assert_array_equal(np.asarray(out.valid)[b], np.r_[on_tok[n * (G - k), :P] != 0, np.arange(T) < L])
        assert np.asarray(out.behaviour_logp)[b].sum() == 0 and np.asarray(out.entropy)[b].sum() == 0
        assert out.lengths[b] == L and not out.truncated[b] and out.stop_len[b] == 1


def test_expert_rows_count_for_eligibility_but_are_never_echo_clips():
    N, G, k, P, T = 2, 3, 1, 3, 5
    on = fake_rollout(N, G - k, P, T, seed=1)
    ro = offpolicy.mix_expert_rows(on, jnp.full((N, k, T), 7, jnp.int32), jnp.full((N, k), T, jnp.int32))
    ro = ro._replace(entropy=jnp.where(jnp.asarray(offpolicy.expert_rows(N * G, G, k))[:, None], 99.0, ro.entropy))
    obj, echo = luffy_objective(), EchoConfig()
    score = rollout_lib.make_scorer(obj, echo, np.array([7], np.int32), T)
    reward = jnp.asarray([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # group 1: the expert fails
    _, adv, clips = score(ro, reward)
    clip_rows = np.asarray(clips.mask_bt).any(axis=1)
    assert clip_rows[:G].sum() == 1 and not clip_rows[G - 1]  # all-success group: one clip, not the expert's
    assert not clip_rows[G:].any()  # the expert's failure makes group 1 mixed: no clip
    adv = np.asarray(adv)[:, 0]
    np.testing.assert_allclose(adv[G:], [1 / 3, 1 / 3, -2 / 3], rtol=1e-6)  # r - mean over the mixed group
    np.testing.assert_array_equal(adv[:G], 0.0)


# ----------------------------------------------------------------------------- expert data


def test_expert_texts_forms():
    assert offpolicy.expert_texts("a") == ["a"]
    assert offpolicy.expert_texts(["a", "b"]) == ["a", "b"]
    assert offpolicy.expert_texts([{"role": "assistant", "content": "c"}]) == ["c"]  # LUFFY's `target`
    assert offpolicy.expert_texts([{"role": "user", "content": "c"}]) is None
    assert offpolicy.expert_texts("") is None and offpolicy.expert_texts(None) is None


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rows_with_expert(n, expert_key="expert"):
    return [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i), expert_key: f"{i} + {i} = {2 * i}. The answer is \\boxed{{{2 * i}}}"}
            for i in range(n)]  # fmt: skip


def luffy_cfg(tmp_path, train_file, **overrides):
    tok_dir = tmp_path / "tok"
    if not tok_dir.exists():
        make_bpe_tokenizer().save_pretrained(tok_dir)
    values = config_lib.load_config_file(str(config_lib_root() / "configs" / "tiny_test.py"))
    base = {
        "objective.method": "luffy", "model.vocab_size": VOCAB_SIZE, "data.train": train_file, "data.eval": "",
        "data.tokenizer": str(tok_dir), "data.max_prompt_len": 32, "sampling.max_new_tokens": 40,
        "sft.steps": 0, "train.steps": 1, "train.export_hf": False, "train.resume": False,
        "train.workdir": str(tmp_path / "run"),
    }  # fmt: skip
    base.update(overrides)
    return config_lib.build_config(values, config_lib.parse_overrides([f"--config.{k}={v}" for k, v in base.items()]))


def config_lib_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def test_missing_expert_column_fails_at_start_up_naming_file_row_and_column(tmp_path):
    rows = rows_with_expert(3)
    del rows[2]["expert"]
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train\.jsonl, row 2: objective\.expert_per_group=1 .*'expert' or 'target' or 'solution'"):
        setup_lib.load_train_records(luffy_cfg(tmp_path, f))
    cfg = luffy_cfg(tmp_path, write_jsonl(tmp_path / "t2.jsonl", rows_with_expert(2, "trace")), **{"data.expert_key": "trace"})
    assert len(setup_lib.load_train_records(cfg)) == 2
    setup_lib.load_train_records(luffy_cfg(tmp_path, f, **{"objective.method": "grpo"}))  # not needed: no check


def test_expert_per_group_must_leave_an_on_policy_rollout(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="objective.expert_per_group=4 .* rl.group_size=4"):
        luffy_cfg(tmp_path, "x.jsonl", **{"objective.expert_per_group": 4})


def test_long_expert_responses_are_truncated_dropped_or_fail(tmp_path):
    rows = rows_with_expert(3)
    rows[1]["expert"] = "1 " * 60  # > max_new_tokens tokens
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    tok = make_bpe_tokenizer()
    long_ids = tok(rows[1]["expert"], add_special_tokens=False)["input_ids"]
    assert len(long_ids) > 40
    # Default (LUFFY's script): truncated to the first T tokens, no stop token; the record is kept.
    cfg = luffy_cfg(tmp_path, f)
    assert cfg.data.expert_overlong == "truncate"
    records = setup_lib.load_train_records(cfg)
    lines = []
    kept, experts = setup_lib.load_experts(cfg, records, tok, (0,), False, 0, lines.append)
    assert len(kept) == 3 and any("truncating to 40 tokens (no stop) 1 of 3" in line for line in lines)
    tokens, lengths = experts.rows(np.array([1, 2]))
    np.testing.assert_array_equal(tokens[0, 0], long_ids[:40])  # no stop at the end
    assert lengths[0, 0] == 40
    np.testing.assert_array_equal(experts.truncated(np.array([1, 2])), [[True], [False]])
    # In the mixed rollout the truncated expert row ends like a rollout that ran out of room.
    N, G, P, T = 2, 2, 3, 40
    on = Rollout(tokens=jnp.zeros((N, P + T), jnp.int32), valid=jnp.ones((N, P + T), bool),
                 response_mask=jnp.ones((N, T), bool), behaviour_logp=jnp.zeros((N, T)), entropy=jnp.zeros((N, T)),
                 lengths=jnp.full((N,), T, jnp.int32), truncated=jnp.zeros((N,), bool),
                 stop_len=jnp.ones((N,), jnp.int32))  # fmt: skip
    mixed = offpolicy.mix_expert_rows(on, jnp.asarray(tokens), jnp.asarray(lengths),
                                      jnp.asarray(experts.truncated(np.array([1, 2]))))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(mixed.truncated), [False, True, False, False])
    np.testing.assert_array_equal(np.asarray(mixed.stop_len), [1, 0, 1, 1])
    # 'drop': the record goes.
    kept, experts = setup_lib.load_experts(luffy_cfg(tmp_path, f, **{"data.expert_overlong": "drop"}), records, tok,
                                           (0,), False, 0, lines.append)  # fmt: skip
    assert [r["ground_truth"] for r in kept] == ["0", "4"]
    assert any("dropped 1 of 3" in line for line in lines)
    tokens, lengths = experts.rows(np.array([1, 0]))
    ids = tok(rows[2]["expert"], add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(tokens[0, 0, : len(ids) + 1], [*ids, 0])  # + the stop token
    assert lengths[0, 0] == len(ids) + 1 and (tokens[0, 0, len(ids) + 1 :] == 0).all()
    assert not experts.truncated(np.array([1, 0])).any()
    # Chat prompts end the expert response with the template's end of turn.
    _, chat_experts = setup_lib.load_experts(cfg, kept, tok, (0,), True, 0, lines.append)
    assert chat_experts.stop_id == tok.convert_tokens_to_ids(IM_END)
    with pytest.raises(DataError, match="1 of 3 train records have an expert response longer"):
        setup_lib.load_experts(luffy_cfg(tmp_path, f, **{"data.expert_overlong": "error"}), records, tok, (0,), False,
                               0, lines.append)  # fmt: skip
    with pytest.raises(config_lib.ConfigError, match="data.expert_overlong='cut'"):
        luffy_cfg(tmp_path, f, **{"data.expert_overlong": "cut"})


def test_add_to_takes_every_process_s_expert_rows(tmp_path, monkeypatch):
    """Multi-process: the rollout holds all processes' prompts but the batch only this one's. add_to gathers the
    record indices (process order), so each group gets its own prompt's expert rows (before the fix this host's
    2 records were reshaped over 4 groups: 2 * (2 * 2 + 1) rows instead of 4 * 3)."""
    from types import SimpleNamespace

    from echorl_jax import sharding

    rows = rows_with_expert(6)
    tok = make_bpe_tokenizer()
    experts = offpolicy.ExpertTraces(rows, tok, key="expert", k=1, max_new_tokens=40, stop_id=0, pad_id=0)
    mine, other = np.array([4, 1]), np.array([0, 5])  # process 0's records, then process 1's
    monkeypatch.setattr(sharding, "gather_rows", lambda x: np.concatenate([np.asarray(x), other]))
    N, G, k, P, T = 4, 3, 1, 3, 40
    out = experts.add_to(fake_rollout(N, G - k, P, T), SimpleNamespace(record_index=mine))
    assert out.tokens.shape == (N * G, P + T)
    for n, record in enumerate([4, 1, 0, 5]):
        ids = tok(rows[record]["expert"], add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(np.asarray(out.tokens)[n * G + G - 1, P : P + len(ids) + 1], [*ids, 0])
        np.testing.assert_array_equal(np.asarray(out.tokens)[n * G + G - 1, :P], [0, 10 + n, 20 + n])


# ----------------------------------------------------------------------------- one RL step


@pytest.mark.slow  # two end-to-end runs: slow set (CI runs it)
def test_luffy_and_luffy_echo_run_one_rl_step_on_a_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", rows_with_expert(8))
    setup = None
    for method in ("luffy", "luffy+echo"):
        cfg = luffy_cfg(tmp_path, f, **{"objective.method": method, "train.workdir": str(tmp_path / method),
                                        "echo.enabled": method == "luffy+echo"})
        assert cfg.objective.expert_per_group == 1 and cfg.echo.enabled == (method == "luffy+echo")
        out = train.train(cfg, setup=setup)
        setup = out["setup"]
        row = next(r for r in read_jsonl(tmp_path / method / "metrics.jsonl") if r["kind"] == "train")
        assert row["expert/accuracy"] == 1.0  # the expert responses are verified, and right
        assert np.isfinite(row["loss"]) and row["grad_norm"] > 0
        assert 0 < row["offpolicy_prob"] < 1
        assert ("echo_loss" in row) == (method == "luffy+echo")
