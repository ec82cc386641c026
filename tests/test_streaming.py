"""Streaming rollouts (rl.max_staleness >= 1): the decode schedule never changes a rollout, every token carries
the version that drew it, no token past the bound reaches a loss, and a pool of one batch is the synchronous
trainer. References: the synchronous sampler (each admission batch sampled alone) and the synchronous run."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echorl_jax import config as config_lib
from echorl_jax.models.config import ModelConfig
from echorl_jax.models.transformer import Transformer
from echorl_jax.rl import offpolicy
from echorl_jax.sampling.sampler import SamplingConfig, make_sampler
from echorl_jax.sampling.stream import NEVER, StreamDecoder, StreamPool
from echorl_jax.trainer.train import train
from tests.multiproc import assert_rows_close
from tests.test_train import _params, _rows, tiny_cfg

TINY = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   init_std=0.3)  # fmt: skip
T, PAD, STOP, G, N, P = 12, 0, 39, 3, 4, 6
SAMPLED = SamplingConfig(temperature=0.7, top_k=8, top_p=0.95, max_new_tokens=T)


@pytest.fixture(scope="module")
def split():
    return nnx.split(Transformer(TINY, rngs=nnx.Rngs(0)))


def _batches(count: int, seed: int = 0):
    """Admission batches: N prompts [N, P] left-padded, lengths, and forced stop lengths per rollout (long tail)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        lengths = rng.integers(1, P + 1, N).astype(np.int32)
        tokens = rng.integers(1, 38, (N, P)).astype(np.int32)
        tokens[np.arange(P)[None, :] < (P - lengths)[:, None]] = PAD
        stop_at = np.minimum(np.ceil(rng.lognormal(1.0, 0.8, N * G)), T + 1).astype(np.int32)  # > T: never forced
        out.append((tokens, lengths, stop_at))
    return out


def _pool(graphdef, state, batches_in_pool: int, slots: int, bound: int = 8):
    sampler = make_sampler(graphdef, SAMPLED, group_size=G, stop_ids=(STOP,), pad_id=PAD)
    sampler.prepare(state, P)
    pool = StreamPool(StreamDecoder(sampler, batches_in_pool * N, slots, P), N, bound)
    weights = sampler.decode_weights(state).params
    pool.start(weights, jax.random.key(0))
    return sampler, pool, weights


def _run_pool(pool, weights, batches, steps: int, versions=None):
    """``steps`` harvests; batch j is admitted with key fold_in(key(7), j) and record j. Returns the harvests."""
    feed = iter(enumerate(batches))

    def prompts():
        j, (tokens, lengths, stop_at) = next(feed)
        return tokens, lengths, [(j, n) for n in range(N)], stop_at

    out, admitted = [], 0
    for step in range(steps):
        v = step if versions is None else versions[step]
        dropped = pool.drop_stale(v)
        # the a-th admission overall samples batch a with key fold_in(key(7), a)
        records, rollout, version_bt, admitted = pool.draw(weights, v, prompts,
                                                           lambda a: jax.random.fold_in(jax.random.key(7), a), admitted)
        out.append((records, jax.tree.map(np.asarray, rollout), np.asarray(version_bt), dropped, pool.counters()))
    return out


@pytest.mark.parametrize("batches_in_pool,slots", [(1, 5), (2, 5), (3, 12)])
def test_every_streamed_rollout_equals_the_synchronous_sampler_s(split, batches_in_pool, slots):
    """Carrying rollouts across harvests, refilling from a pool of several batches and resuming decode in
    another call change when a rollout is decoded, never what: each harvested group equals the synchronous
    sampler's rows for its admission batch and key (same weights throughout)."""
    graphdef, state = split
    sampler, pool, weights = _pool(graphdef, state, batches_in_pool, slots)
    batches = _batches(8)
    harvests = _run_pool(pool, weights, batches, 5)
    seen = set()
    for records, ro, version_bt, dropped, _ in harvests:
        assert dropped == 0
        for i, (j, n) in enumerate(records):
            seen.add((j, n))
            tokens, lengths, stop_at = batches[j]
            ref = sampler(state, tokens, lengths, jax.random.fold_in(jax.random.key(7), j),
                          bench_stop_lengths=stop_at)  # fmt: skip
            rows = slice(n * G, (n + 1) * G)
            got = slice(i * G, (i + 1) * G)
            for name in ("response_mask", "lengths", "truncated", "stop_len"):
                np.testing.assert_array_equal(getattr(ro, name)[got], np.asarray(getattr(ref, name))[rows], err_msg=name)
            t_mask = ro.response_mask[got]
            np.testing.assert_array_equal(np.where(t_mask, ro.tokens[got, -T:], -1),
                                          np.where(t_mask, np.asarray(ref.tokens)[rows, -T:], -1))  # fmt: skip
            np.testing.assert_array_equal(ro.tokens[got, :P], np.asarray(ref.tokens)[rows, :P])
            np.testing.assert_allclose(ro.behaviour_logp[got], np.asarray(ref.behaviour_logp)[rows], atol=1e-5)
    # harvests come in admission order when every group of the earlier batch is done (FIFO)
    assert len(seen) == 5 * N
    if batches_in_pool == 1:
        assert [sorted(r) for r, *_ in harvests] == [[(j, n) for n in range(N)] for j in range(5)]


def test_tokens_carry_the_version_that_drew_them_and_the_bound_drops_older_groups(split):
    """With a pool of two batches and few slots, rollouts span harvests: a token's tag is the version its
    advance ran at; with bound k no harvested token is more than k versions old, and the groups that would
    break it are dropped, not harvested."""
    graphdef, state = split
    for bound in (0, 1):
        sampler, pool, weights = _pool(graphdef, state, 3, 3, bound=bound)
        harvests = _run_pool(pool, weights, _batches(40, seed=1), 8)
        lags, dropped = [], 0
        for v, (_, ro, version_bt, d, counters) in enumerate(harvests):
            mask = ro.response_mask
            assert (version_bt[mask] <= v).all()
            lags.extend((v - version_bt[mask]).tolist())
            # within a rollout, versions never go down along the response
            assert (np.diff(np.where(mask, version_bt, v), axis=1)[mask[:, 1:]] >= 0).all()
            dropped += d
            assert 0 < counters["sampler/slot_occupancy"] <= 1
        assert max(lags) <= bound
        if bound == 1:
            assert max(lags) == 1  # rollouts did carry across a harvest
        else:
            assert dropped > 0  # k = 0: a carried group is dropped at the next step


def test_expert_rows_take_their_group_s_oldest_version():
    """LUFFY: each group's k expert rows carry the oldest tag of the group's sampled tokens."""
    rng = np.random.default_rng(3)
    n, g_on, k, t = 3, 2, 2, 5
    version = rng.integers(0, 9, (n * g_on, t)).astype(np.int32)
    mask = rng.random((n * g_on, t)) < 0.7
    mask[2:4] = False  # group 1 drew no token: its expert rows take any of its tags
    got = np.asarray(offpolicy.mix_versions(jnp.asarray(version), jnp.asarray(mask), n, g_on + k))
    for i in range(n):
        rows = slice(i * g_on, (i + 1) * g_on)
        on = version[rows]
        np.testing.assert_array_equal(got[i * (g_on + k) : i * (g_on + k) + g_on], on)
        want = on[mask[rows]].min() if mask[rows].any() else on.max()
        assert (got[i * (g_on + k) + g_on : (i + 1) * (g_on + k)] == want).all()


STREAM = {"rl": {"max_staleness": 1, "recompute_logp": True}, "objective": {"rollout_correction": "token_tis"}}


def _cfg(workdir, rl=None, objective=None, **sections):
    rl = {**STREAM["rl"], **(rl or {})}
    return tiny_cfg(workdir, rl=rl, objective={**STREAM["objective"], **(objective or {})}, **sections)


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("stream/", "sampler/", "staleness/lag1"))} for r in rows]


def test_streaming_needs_the_decoupled_correction_and_its_pool_setting_needs_streaming(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="rl.recompute_logp=true.*rollout_correction=token_tis"):
        tiny_cfg(tmp_path, rl={"max_staleness": 1})
    with pytest.raises(config_lib.ConfigError, match="rl.stream_batches=3 is invalid: is read only with"):
        tiny_cfg(tmp_path, rl={"stream_batches": 3})
    with pytest.raises(config_lib.ConfigError, match="rl.max_staleness=-1"):
        tiny_cfg(tmp_path, rl={"max_staleness": -1})


@pytest.mark.slow  # two short runs; CI's slow set runs it
def test_a_pool_of_one_batch_is_the_synchronous_trainer(tmp_path):
    """rl.stream_batches = 1: every step admits, decodes and harvests exactly the synchronous batch (same
    prompts, keys and weights), so metrics and parameters equal the k = 0 run's."""
    steps = {"train": {"steps": 3}}
    sync = train(tiny_cfg(tmp_path / "sync", rl=STREAM["rl"] | {"max_staleness": 0}, objective=STREAM["objective"],
                          **steps))  # fmt: skip
    stream = train(_cfg(tmp_path / "stream", rl={"stream_batches": 1}, **steps))
    a, b = _strip(_rows(tmp_path / "sync")), _strip(_rows(tmp_path / "stream"))
    assert len(a) == len(b) == 3
    assert all(r["staleness/lag1_frac"] == 0 for r in _rows(tmp_path / "stream"))  # nothing carried
    assert_rows_close(b, a)
    for x, y in zip(jax.tree.leaves(_params(sync)), jax.tree.leaves(_params(stream))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_a_streaming_run_keeps_the_bound_and_resumes_exactly(tmp_path):
    """k = 1 over a pool of two batches: tokens one version old reach the loss, none older; a run stopped
    at step 2 and resumed (the in-flight rollouts come back from the checkpoint) equals the straight run."""
    straight = train(_cfg(tmp_path / "a", train={"steps": 4, "save_every": 2}))
    rows = _rows(tmp_path / "a")
    assert max(r["staleness/max_lag"] for r in rows) == 1
    assert any(r["staleness/lag1_frac"] > 0 for r in rows)
    assert sum(r["stream/carried_rollouts"] for r in rows) > 0
    train(_cfg(tmp_path / "b", train={"steps": 2, "save_every": 2}))
    # the straight run's setup (compiled programs, and its final state, which the checkpoint replaces)
    resumed = train(_cfg(tmp_path / "b", train={"steps": 4, "save_every": 2}), setup=straight["setup"])
    assert _rows(tmp_path / "b") == rows
    for x, y in zip(jax.tree.leaves(_params(straight)), jax.tree.leaves(_params(resumed))):
        np.testing.assert_array_equal(x, y)
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "4" / "stream")


@pytest.mark.slow  # three two-step runs: CI's slow set runs it
def test_dapo_luffy_and_lora_stream_under_the_bound_on_a_sampler_mesh(tmp_path):
    """k = 2 with 4 sampler + 4 learner devices (mesh.sampler_devices; the colocated pool's draw is the same
    code): DAPO (dynamic sampling draws further rounds after the round decoded during the update), LUFFY (expert
    rows take their group's version) and LoRA (only the adapters are pushed each step): finite, within the bound."""
    setup, pushed = None, {}
    runs = [("dapo", {}), ("luffy", {}), ("grpo", {"lora": {"rank": 4}})]
    for name, model in runs:
        tag = name + ("_lora" if model else "")
        cfg = _cfg(tmp_path / tag, rl={"max_sample_rounds": 2, "max_staleness": 2}, objective={"method": name},
                   mesh={"sampler_devices": 4}, train={"steps": 2, "export_hf": False, "eval_every": 0},
                   data={"eval": ""}, **({"model": model} if model else {}))  # fmt: skip
        same = setup is not None and setup.cfg.objective.expert_per_group == cfg.objective.expert_per_group \
            and setup.cfg.model == cfg.model  # fmt: skip
        out = train(cfg, setup=setup if same else None)
        setup = out["setup"]
        rows = _rows(tmp_path / tag)
        assert [r["step"] for r in rows] == [1, 2], tag
        for r in rows:
            assert np.isfinite(r["loss"]) and r["staleness/max_lag"] <= 2, (tag, r)
        assert rows[-1]["staleness/max_lag"] >= 1, tag  # decoded during the last update: one version back at least
        pushed[tag] = rows[-1]["push/bytes"]
        if name == "luffy":
            assert rows[0]["expert/accuracy"] == 1.0
    adapters = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.state.params))
    assert pushed["grpo_lora"] == 4 * (adapters + 4)  # every sampler device: the adapters and the int32 version
    assert pushed["dapo"] > 3 * pushed["grpo_lora"]


@pytest.mark.slow  # compiles every planned phase
def test_the_planner_counts_the_streaming_state_a_real_pool_holds(tmp_path):
    """plan.py keeps the streaming decode state resident through the learner's phases and the pool beside the
    sampler; its count is what device 0 really holds of a built pool (within the slot table's few bytes)."""
    from echorl_jax import plan
    from echorl_jax.trainer import setup as setup_lib
    from echorl_jax.trainer.stream_source import StreamSource

    cfg = _cfg(tmp_path, sampling={"slots": 8})
    sync = plan.plan(tiny_cfg(tmp_path, sampling={"slots": 8}))
    pl = plan.plan(cfg)
    s = setup_lib.build_setup(cfg, log=lambda _: None)
    pool = StreamSource(s).ensure(s.state.params)
    dev = jax.devices()[0]
    real = sum(sh.data.nbytes for x in jax.tree.leaves(pool.state) for sh in x.addressable_shards if sh.device == dev)
    assert pl.stream_state == pytest.approx(real, rel=0.05)
    assert pl.phase("train step").resident - sync.phase("train step").resident == pl.stream_state
    assert pl.phase("sampler").resident > sync.phase("sampler").resident


def test_a_rollout_started_under_new_weights_is_that_policy_s_whole(split):
    """After an update, groups still pending start from prompts prefilled again with the new weights: a
    rollout whose tokens are all tagged with the new version equals the synchronous sampler's under the new
    weights (first token included), one wholly under the old version equals the old weights' rollout."""
    graphdef, state = split
    state1 = jax.tree.map(lambda x: x * 1.5, state)  # "version 1": different logits everywhere
    sampler, pool, w0 = _pool(graphdef, state, 3, 3)
    w1 = sampler.decode_weights(state1).params
    batches = _batches(10, seed=2)
    feed = iter(enumerate(batches))

    def prompts():
        j, (tokens, lengths, stop_at) = next(feed)
        return tokens, lengths, [(j, n) for n in range(N)], stop_at

    key = lambda a: jax.random.fold_in(jax.random.key(7), a)  # noqa: E731
    _, _, _, admitted = pool.draw(w0, 0, prompts, key, 0)
    records, ro, version_bt, _ = pool.draw(w1, 1, prompts, key, admitted)
    ro, version_bt = jax.tree.map(np.asarray, ro), np.asarray(version_bt)
    whole = {0: 0, 1: 0}
    for i, (j, n) in enumerate(records):
        tokens, lengths, stop_at = batches[j]
        for g in range(G):
            row, mask = i * G + g, ro.response_mask[i * G + g]
            tags = set(version_bt[row][mask].tolist())
            if len(tags) != 1:
                continue
            v = tags.pop()
            ref = sampler(state1 if v else state, tokens, lengths, key(j), bench_stop_lengths=stop_at)
            np.testing.assert_array_equal(np.where(mask, ro.tokens[row, -T:], -1),
                                          np.where(np.asarray(ref.response_mask)[n * G + g],
                                                   np.asarray(ref.tokens)[n * G + g, -T:], -1))  # fmt: skip
            whole[v] += 1
    assert whole[1] > 0 and whole[0] > 0, whole


@pytest.mark.slow  # two 2-process runs (~1-2 min on 2 cores); CI runs it
def test_two_processes_stream_on_their_sampler_devices_under_the_bound_and_resume(tmp_path):
    """2 processes x 4 devices, 2 of each for the sampler (mesh.sampler_devices=4), k = 2 over a pool of two
    batches: each process streams its own pool partition (its prompts, its rows) on its own sampler devices,
    pushes to them and moves its own rows back; tokens one and two versions old reach the loss and none older;
    stopped at step 2 and resumed on 2 processes (every partition's in-flight rollouts and the round decoded
    during step 2's update from the checkpoint), the run goes on to step 4 under the bound. One mode covers
    both: the pool's partitions and collectives are the colocated stream's (k = 1 with rl.stream_batches=1 on
    2 processes was run the same way; single-process tests cover the colocated copy and k = 1)."""
    from tests.multiproc import metric_rows, run_tool
    from tests.test_pods import _reward_file, _train_args

    reward = _reward_file(tmp_path)
    stream = {"mesh.sampler_devices": 4, "rl.max_staleness": 2, "rl.recompute_logp": "true",
              "objective.rollout_correction": "token_tis", "train.save_every": 2, "train.export_hf": "false"}  # fmt: skip
    run = tmp_path / "run"
    out = run_tool(tmp_path, "first", ["main", *_train_args(run, reward, steps=2, **stream)])
    assert "sampler mesh of 4 device(s), learner mesh of 4" in out.logs[0]
    first = metric_rows(run)
    out = run_tool(tmp_path, "resumed", ["main", *_train_args(run, reward, steps=4, **stream)])
    assert "resumed from step 2" in out.logs[0]
    rows = metric_rows(run)
    assert rows[: len(first)] == first
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert max(r["staleness/max_lag"] for r in train_rows) <= 2 and all(r["staleness/lag0_frac"] == 0
                                                                        for r in train_rows[1:])  # fmt: skip
    assert 0 < train_rows[0]["reward/mean"] < 1  # a real signal from every process's rows
