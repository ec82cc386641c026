"""Supervised warm start: batch layout, loss against numpy, training, and the result cache."""

import dataclasses
import functools
import os

import jax
import numpy as np
import pytest
from flax import nnx

from echorl_jax import sharding
from echorl_jax.models.config import ModelConfig
from echorl_jax.models.transformer import Transformer, positions_from_valid
from echorl_jax.tasks.arith import ArithTask, make_records
from echorl_jax.tasks.tokenizer import build_char_tokenizer
from echorl_jax.trainer import sft

P, T = 20, 44  # the default task's prompts are <= 14 chars, solutions + eos <= 41


@dataclasses.dataclass(frozen=True)
class SFT:  # the fields of config.SFTConfig that warm_start reads
    steps: int = 10
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    cache_dir: str = ""


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def records():
    return make_records(ArithTask(), "train", 32, seed=0)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((2, 2, 2))  # batch over 4 devices, weights split over fsdp and tensor


@functools.lru_cache(maxsize=None)
def _init(seed, init_std):
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, init_std=init_std)  # fmt: skip
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
    return graphdef, jax.device_get(state)


def tiny_model(mesh, seed=0, init_std=0.02):
    """A fresh model (warm_start donates its input's buffers); initialised once per (seed, std)."""
    graphdef, state = _init(seed, init_std)
    return sharding.shard_model(nnx.merge(graphdef, state, copy=True), mesh)


def params_np(model):
    return {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(model, nnx.Param)).items()}


# ----------------------------------------------------------------------------- batch layout


def test_batch_layout_matches_slow_reference(tok, records):
    template = "Q: {prompt}"
    batch = sft.build_sft_batch(records, tok, P, T, template=template)
    assert batch["tokens_bs"].shape == (len(records), P + T) and batch["tokens_bs"].dtype == np.int32
    for i, r in enumerate(records):
        q = tok.encode(template.format(prompt=r["prompt"]), add_special_tokens=False)
        a = tok.encode(r["solution"], add_special_tokens=False) + [tok.eos_token_id]
        row = [tok.pad_token_id] * (P - len(q)) + q + a + [tok.pad_token_id] * (T - len(a))
        valid = [False] * (P - len(q)) + [True] * (len(q) + len(a)) + [False] * (T - len(a))
        np.testing.assert_array_equal(batch["tokens_bs"][i], row)
        np.testing.assert_array_equal(batch["valid_bs"][i], valid)
        np.testing.assert_array_equal(batch["mask_bt"][i], valid[P:])
        assert tok.decode(batch["tokens_bs"][i, P : P + len(a) - 1]) == r["solution"]


def test_batch_errors_name_the_record(tok, records):
    long_solution = [*records[:3], dict(records[3], solution="1+1=2\n" * 10)]
    with pytest.raises(ValueError, match="record 3: solution"):
        sft.build_sft_batch(long_solution, tok, P, T)
    with pytest.raises(ValueError, match="record 0: prompt has 14 tokens"):
        sft.build_sft_batch([dict(records[0], prompt="1 +2 +3 +4 +5\n")], tok, 10, T)
    with pytest.raises(ValueError, match="record 1 has no 'solution'"):
        sft.build_sft_batch([records[0], {"prompt": "1 +1\n"}], tok, P, T)


# ----------------------------------------------------------------------------- loss


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sft_loss_matches_numpy_reference(tok, records, mesh):
    model = tiny_model(mesh, init_std=0.5)  # large init: far-from-uniform logits, so misalignment shows
    batch = sft.build_sft_batch(records[:8], tok, P, T)
    graphdef, params = nnx.split(model)
    loss, metrics = jax.jit(lambda p, b: sft.sft_loss(graphdef, p, b))(params, batch)

    # Independent path: full-forward logits, the next token picked out by hand.
    valid = batch["valid_bs"]
    forward = nnx.jit(lambda m, tokens, valid: m(tokens, positions_from_valid(valid), valid)[0])
    logits = np.asarray(forward(model, batch["tokens_bs"], valid), np.float64)
    nll = []
    for b in range(8):
        for t in range(T):
            if batch["mask_bt"][b, t]:
                s = P + t  # token at column s is predicted by the logits at column s - 1
                nll.append(-_log_softmax(logits[b, s - 1])[batch["tokens_bs"][b, s]])
    assert float(metrics["num_tokens"]) == len(nll)
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
    # Training drops all-padding columns; the loss must not change.
    trimmed = sft._trim(batch, P)
    assert trimmed["tokens_bs"].shape[1] < P + T
    loss_trimmed, _ = jax.jit(lambda p, b: sft.sft_loss(graphdef, p, b))(params, trimmed)
    np.testing.assert_allclose(float(loss_trimmed), np.mean(nll), rtol=1e-5)
    assert np.mean(nll) > np.log(128) + 0.5  # the check above is not uniform-logits trivia


# ----------------------------------------------------------------------------- training


@pytest.mark.slow  # a warm start; test_sft_loss_matches_numpy_reference checks the loss: slow set (CI runs it)
def test_warm_start_lowers_the_loss(tok, records, mesh):
    model = tiny_model(mesh)
    graphdef, _ = nnx.split(model)
    full = sft.build_sft_batch(records, tok, P, T)
    loss_fn = jax.jit(lambda p, b: sft.sft_loss(graphdef, p, b)[0])
    before = float(loss_fn(nnx.state(model), full))
    logged = []
    out = sft.warm_start(model, tok, records, SFT(steps=60), mesh=mesh, prompt_len=P, response_len=T,
                         cache_dir=None, seed=0, log_fn=lambda step, m: logged.append((step, m)))  # fmt: skip
    after = float(loss_fn(nnx.state(out), full))
    assert after < 0.7 * before, (before, after)
    assert [s for s, _ in logged] == [10, 20, 30, 40, 50, 60]
    assert {"loss", "grad_norm", "lr", "entropy"} <= set(logged[-1][1])
    assert nnx.graphdef(out) == graphdef
    # Parameters stay on their mesh shardings.
    want = sharding.state_shardings(nnx.state(out), mesh)
    for x, s in zip(jax.tree.leaves(nnx.state(out)), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(s, x.ndim)


# ----------------------------------------------------------------------------- cache


def test_cache_reuses_result_and_keys_change(tok, records, mesh, tmp_path):
    cache = str(tmp_path / "warm")
    cfg = SFT(steps=10)
    kw = dict(mesh=mesh, prompt_len=P, response_len=T, seed=0)
    key = sft.cache_key(tiny_model(mesh), tok, records, cfg, **kw)

    # Leftovers of an interrupted run: a temp dir (never loaded) and a half-written entry (retrained).
    os.makedirs(os.path.join(cache, f".{key}.tmp-abc"))
    os.makedirs(os.path.join(cache, key))
    with open(os.path.join(cache, key, "config.json"), "w") as f:
        f.write("{")

    calls = []
    run = dict(kw, cache_dir=cache, log_fn=lambda *a: calls.append(a))
    first = sft.warm_start(tiny_model(mesh), tok, records, cfg, **run)
    assert len(calls) == 1  # trained
    assert os.path.isfile(os.path.join(cache, key, "model.safetensors"))
    trained = params_np(first)

    second = sft.warm_start(tiny_model(mesh), tok, records, cfg, **run)
    assert len(calls) == 1  # loaded, no training step
    loaded = params_np(second)
    assert set(loaded) == set(trained)
    for k in trained:
        np.testing.assert_array_equal(loaded[k], trained[k], err_msg=k)
    assert not np.array_equal(trained["embed"], params_np(tiny_model(mesh))["embed"])

    changed = [
        sft.cache_key(tiny_model(mesh), tok, records, cfg, **dict(kw, seed=1)),
        sft.cache_key(tiny_model(mesh), tok, records, SFT(steps=11), **kw),
        sft.cache_key(tiny_model(mesh), tok, records, SFT(steps=10, learning_rate=1e-3), **kw),
        sft.cache_key(tiny_model(mesh, seed=1), tok, records, cfg, **kw),  # other initial weights
        sft.cache_key(tiny_model(mesh), tok, records[:-1], cfg, **kw),
        sft.cache_key(tiny_model(mesh), tok, [*records[:-1], dict(records[-1], solution="x")], cfg, **kw),
        sft.cache_key(tiny_model(mesh), tok, records, cfg, **dict(kw, response_len=T + 1)),
    ]
    assert len({key, *changed}) == len(changed) + 1
    # Where the cache lives is not part of what it holds.
    assert sft.cache_key(tiny_model(mesh), tok, records, dataclasses.replace(cfg, cache_dir="/x"), **kw) == key


def test_cache_store_is_safe_when_another_process_stored_the_entry_first(tok, records, mesh, tmp_path):
    """Two runs sharing sft.cache_dir finish the same entry: the first rename wins, nothing is deleted."""
    cache = str(tmp_path / "warm")
    model = tiny_model(mesh)
    path = os.path.join(cache, "entry")
    sft._store_cached(path, model, tok)  # the other process's finished entry
    marker = os.path.join(path, "written_first")
    open(marker, "w").close()
    sft._store_cached(path, tiny_model(mesh, seed=1), tok)  # ours, finished a moment later
    assert os.path.isfile(marker)  # theirs kept (it may be being read), ours dropped
    assert [n for n in os.listdir(cache) if n.startswith(".")] == []  # no temp dirs left behind
    sft._store_cached(path, tiny_model(mesh, seed=1), tok, replace_stale=True)  # a stale entry is replaced
    assert not os.path.exists(marker) and os.path.isfile(os.path.join(path, "model.safetensors"))


def test_cache_in_a_bucket_round_trips(tok, records, mesh, tmp_path):
    """A warm-start cache in a bucket (train.workdir on gs://): stored through epath, loaded back exactly."""
    import fake_gcs
    from flax import nnx

    fake_gcs.install(tmp_path / "gcs")
    try:
        path = "gs://bucket/run/warmstart/entry"
        model = tiny_model(mesh, seed=3)
        sft._store_cached(path, model, tok)
        assert os.path.isfile(tmp_path / "gcs" / "bucket" / "run" / "warmstart" / "entry" / "model.safetensors")
        loaded = sft._load_cached(path, tiny_model(mesh), mesh)
        want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        got = nnx.to_pure_dict(loaded)
        jax.tree.map(np.testing.assert_array_equal, got, want)
        assert sft._load_cached("gs://bucket/run/warmstart/none", tiny_model(mesh), mesh) is None
    finally:
        fake_gcs.uninstall()
