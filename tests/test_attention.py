"""Attention backends vs the ``xla`` reference (values and gradients, fp32), the model with
``model.attention`` set, backend selection/validation, and the memory win of ``xla_chunked``.

On CPU: ``xla_chunked`` runs natively; ``splash`` runs its real Pallas kernel in interpret
mode; ``cudnn`` cannot run (no GPU), so its wrapper (layout, key lengths, the model's
roll to right padding) runs with ``jax.nn.dot_product_attention(implementation="xla")``,
the same call and mask semantics without the cuDNN kernel.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echorl_jax import config as config_lib
from echorl_jax.models import attention as attn_lib
from echorl_jax.models.config import ModelConfig, ModelConfigError, from_hf_config, to_hf_config
from echorl_jax.models.transformer import Transformer, init_cache, positions_from_valid

TOL = 1e-5


def random_qkv(b=3, s=40, n=4, g=2, d=8, seed=0):
    """GQA (2 query heads per kv head); rows: no padding, left + right padding, left padding only."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((b, g, s, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, g, s, d)), jnp.float32)
    valid = np.zeros((b, s), bool)
    valid[0] = True
    valid[1, 5 : s - 7] = True
    valid[2, s // 2 - 3 :] = True
    w = jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32)
    return q, k, v, jnp.asarray(valid), w


def assert_matches_reference(fn, q, k, v, valid, w, q_start=0):
    """Outputs on real query rows and grads of a loss over real rows equal ``xla_attention``."""
    s = q.shape[1]
    q_valid = jax.lax.dynamic_slice_in_dim(valid, q_start, s, axis=1)[:, :, None, None]
    ref_fn = functools.partial(attn_lib.xla_attention, valid_bk=valid, q_start=q_start)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v) * w * q_valid)

    out, ref = fn(q, k, v), ref_fn(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out * q_valid), np.asarray(ref * q_valid), atol=TOL, rtol=0)
    grads, ref_grads = jax.grad(loss(fn), (0, 1, 2))(q, k, v), jax.grad(loss(ref_fn), (0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("q_block,k_block", [(8, 8), (16, 24), (13, 7), (40, 64)])
def test_chunked_matches_xla(q_block, k_block):
    """Blocks that divide s=40 and blocks that do not (padded tails), one block, many."""
    q, k, v, valid, w = random_qkv()
    fn = jax.jit(lambda q, k, v: attn_lib.chunked_attention(q, k, v, valid, q_block=q_block, k_block=k_block))
    assert_matches_reference(fn, q, k, v, valid, w)


def test_chunked_matches_xla_for_a_cache_step():
    """Queries at a traced offset into a longer key cache with holes (the sampler's prefill shape)."""
    q, k, v, valid, w = random_qkv(s=40)
    q, w, start = q[:, :12], w[:, :12], 20
    valid = valid.at[1, 25].set(False)  # a stopped row's slot in the middle of the cache
    fn = jax.jit(lambda q, k, v, p: attn_lib.chunked_attention(q, k, v, valid, p, q_block=5, k_block=8))
    assert_matches_reference(lambda q, k, v: fn(q, k, v, jnp.int32(start)), q, k, v, valid, w, q_start=start)


@pytest.mark.slow  # Pallas in interpret mode: slow set (CI runs it)
def test_splash_interpret_matches_xla():
    """The real splash kernel (Pallas interpret mode on CPU): s=200 is padded to two 128-blocks."""
    q, k, v, valid, w = random_qkv(s=200, d=16)
    fn = jax.jit(lambda q, k, v: attn_lib.splash_attention(q, k, v, valid, block=128, interpret=True))
    assert_matches_reference(fn, q, k, v, valid, w)


def test_cudnn_wrapper_on_right_padded_rows():
    """cudnn's call (causal + key lengths) through jax's xla implementation: right padding only."""
    q, k, v, _, w = random_qkv()
    valid = jnp.asarray(np.arange(40)[None, :] < np.array([[40], [31], [1]]))
    fn = functools.partial(attn_lib.cudnn_attention, valid_bk=valid, implementation="xla")
    assert_matches_reference(fn, q, k, v, valid, w)


def test_right_padding_order_roundtrip():
    valid = jnp.asarray([[0, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    to_bs, back_bs = attn_lib.right_padding_order(valid)
    rolled = attn_lib.take_columns(valid, to_bs)
    np.testing.assert_array_equal(rolled, [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    x = jnp.arange(18).reshape(3, 6)
    np.testing.assert_array_equal(attn_lib.take_columns(attn_lib.take_columns(x, to_bs), back_bs), x)


# ---------------------------------------------------------------- the model with model.attention set

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
            init_std=0.3)  # fmt: skip


def tiny_model(attention: str) -> Transformer:
    return Transformer(ModelConfig(**TINY, attention=attention), rngs=nnx.Rngs(0))


def padded_batch(b=3, s=21, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, TINY["vocab_size"], (b, s)).astype(np.int32)
    valid = np.zeros((b, s), bool)
    valid[0] = True
    valid[1, 6:17] = True  # [left pad | prompt | response | right pad]
    valid[2, 13:] = True
    return jnp.asarray(tokens), jnp.asarray(valid)


def forward_and_grads(model, tokens, valid):
    graphdef, params = nnx.split(model)
    positions = positions_from_valid(valid)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params)(tokens, positions, valid)
        return jnp.sum(jnp.where(valid[..., None], logits, 0.0) ** 2) * 1e-3, logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize("impl", ["xla_chunked", "cudnn_via_xla"])
def test_model_backend_matches_xla(impl, monkeypatch):
    """Logits on real tokens and parameter gradients of the whole model equal the xla backend's.
    ``cudnn_via_xla`` checks the model's roll to right padding around the cudnn call."""
    monkeypatch.setattr(attn_lib, "Q_BLOCK", 8)  # several (non-dividing) blocks at s=21
    monkeypatch.setattr(attn_lib, "K_BLOCK", 5)
    tokens, valid = padded_batch()
    ref_logits, ref_grads = forward_and_grads(tiny_model("xla"), tokens, valid)
    model = tiny_model("xla")
    if impl == "cudnn_via_xla":
        monkeypatch.setattr(attn_lib, "cudnn_attention",
                            functools.partial(attn_lib.cudnn_attention, implementation="xla"))  # fmt: skip
        model.attention_impl = "cudnn"
    else:
        model = tiny_model(impl)
        assert model.attention_impl == "xla_chunked"
    logits, grads = forward_and_grads(model, tokens, valid)
    np.testing.assert_allclose(np.asarray(logits)[valid], np.asarray(ref_logits)[valid], atol=TOL, rtol=0)
    leaves = jax.tree_util.tree_leaves_with_path
    for (path, g), (_, r) in zip(leaves(grads), leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=1e-5, err_msg=str(path))


def test_chunked_model_on_a_mesh_matches_one_device(monkeypatch):
    """Batch over data x fsdp, heads over tensor: the blocked loops partition like the reference."""
    from echorl_jax.sharding import batch_sharding, make_mesh, shard_model

    monkeypatch.setattr(attn_lib, "Q_BLOCK", 8)
    monkeypatch.setattr(attn_lib, "K_BLOCK", 8)
    tokens, valid = padded_batch(b=4)
    ref_logits, ref_grads = forward_and_grads(tiny_model("xla"), tokens, valid)
    mesh = make_mesh((2, 2, 2))
    model = shard_model(tiny_model("xla_chunked"), mesh)
    tokens, valid = (jax.device_put(x, batch_sharding(mesh, 2)) for x in (tokens, valid))
    logits, grads = forward_and_grads(model, tokens, valid)
    # Sharded over 8 devices: float32 sums in another order (logits ~3: rtol 1e-5 is a few ulps).
    np.testing.assert_allclose(np.asarray(logits)[np.asarray(valid)], np.asarray(ref_logits)[np.asarray(valid)],
                               atol=TOL, rtol=1e-5)  # fmt: skip
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=1e-5)


def test_model_prefill_and_decode_with_chunked_match_full_xla_forward(monkeypatch):
    """A multi-token step into the cache (traced offset) runs xla_chunked, decode steps xla."""
    monkeypatch.setattr(attn_lib, "Q_BLOCK", 4)
    monkeypatch.setattr(attn_lib, "K_BLOCK", 3)
    tokens, valid = padded_batch(s=16)
    valid = valid.at[1].set(np.arange(16) >= 6)  # left padding only (a prompt, then decoding)
    positions = positions_from_valid(valid)
    ref, _ = jax.jit(lambda t, p, v: tiny_model("xla")(t, p, v))(tokens, positions, valid)
    model = tiny_model("xla_chunked")
    step = nnx.jit(lambda m, t, p, v, c: m(t, p, v, c))
    cache, outs, p = init_cache(model.cfg, 3, 16), [], 10
    logits, cache = step(model, tokens[:, :p], positions[:, :p], valid[:, :p], cache)
    outs.append(logits)
    for i in range(p, 16):
        logits, cache = step(model, tokens[:, i : i + 1], positions[:, i : i + 1], valid[:, i : i + 1], cache)
        outs.append(logits)
    got = np.concatenate([np.asarray(x) for x in outs], axis=1)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[np.asarray(valid)], np.asarray(ref)[np.asarray(valid)], atol=1e-4, rtol=0)


# ---------------------------------------------------------------- selection and validation


def test_resolve_auto_by_platform_and_dtype():
    assert attn_lib.resolve("auto", "float32", "cpu", 1) == "xla"
    assert attn_lib.resolve("auto", "bfloat16", "gpu", 8) == "cudnn"
    assert attn_lib.resolve("auto", "float32", "gpu", 1) == "xla_chunked"
    assert attn_lib.resolve("auto", "bfloat16", "tpu", 1) == "splash"
    assert attn_lib.resolve("auto", "bfloat16", "tpu", 8) == "xla_chunked"
    assert attn_lib.resolve("xla_chunked", "bfloat16", "tpu", 8) == "xla_chunked"


@pytest.mark.parametrize("name,dtype,platform,devices,why", [
    ("cudnn", "bfloat16", "cpu", 1, "needs a GPU"),
    ("cudnn", "float32", "gpu", 1, "bf16 only"),
    ("splash", "bfloat16", "gpu", 1, "needs a TPU"),
    ("splash", "bfloat16", "tpu", 4, "one device only"),
    ("flash", "float32", "cpu", 1, "allowed"),
])  # fmt: skip
def test_resolve_rejects_what_cannot_run(name, dtype, platform, devices, why):
    with pytest.raises(ModelConfigError, match=rf"model\.attention='{name}'.*{why}"):
        attn_lib.resolve(name, dtype, platform, devices)


def test_model_and_config_validation():
    with pytest.raises(ModelConfigError, match=r"model\.attention='cudnn' cannot run here: .*GPU"):
        tiny_model("cudnn")  # at construction, i.e. at start-up (this process runs on CPU)
    with pytest.raises(config_lib.ConfigError, match=r"model\.attention='bogus'.*allowed"):
        config_lib.build_config({"model": {"attention": "bogus"}})
    # A numerics option: overridable with model.path, never written to config.json.
    cfg = config_lib.build_config({"model": {"path": "/some/dir", "attention": "xla_chunked"}})
    assert cfg.model.attention == "xla_chunked"
    hf = to_hf_config(ModelConfig(attention="xla_chunked"))
    assert "attention" not in hf
    assert from_hf_config(hf, attention="xla_chunked").attention == "xla_chunked"


# ---------------------------------------------------------------- memory


def train_step_temp_bytes(attention: str, b=2, s=1024) -> int:
    model = tiny_model(attention)
    graphdef, params = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((b, s), jnp.int32)
    valid = jax.ShapeDtypeStruct((b, s), bool)

    def loss(params, tokens, valid):
        logits, _ = nnx.merge(graphdef, params)(tokens, positions_from_valid(valid), valid)
        return jnp.mean(logits**2)

    compiled = jax.jit(jax.grad(loss)).lower(params, tokens, valid).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_train_step_has_no_score_tensor():
    """Forward + backward at 2 x 1024 tokens (2 layers): xla saves [b, g, r, s, k] fp32 scores
    per layer for the backward (32 MiB each here); xla_chunked saves none and works on
    [b, g, r, 512, 512] blocks (8 MiB each). Measured on CPU: 243 MiB vs 53 MiB."""
    scores_per_layer = 2 * 4 * 1024 * 1024 * 4
    dense, chunked = train_step_temp_bytes("xla"), train_step_temp_bytes("xla_chunked")
    print(f"temp bytes: xla {dense / 2**20:.1f} MiB, xla_chunked {chunked / 2**20:.1f} MiB")
    assert dense > 2 * scores_per_layer  # the reference really keeps every layer's scores
    assert chunked < dense / 3
    assert chunked < 2 * scores_per_layer


# ---------------------------------------------------------------- packed rows (segment ids)


def packed_qkv(seg_lengths, s, n=4, g=2, d=8, seed=3):
    """Rows holding the given segments from column 0 (ids 1, 2, ...), padding after; ``[]`` = an empty row."""
    rng = np.random.default_rng(seed)
    b = len(seg_lengths)
    seg = np.zeros((b, s), np.int32)
    for i, lengths in enumerate(seg_lengths):
        col = 0
        for j, n_tok in enumerate(lengths):
            seg[i, col : col + n_tok] = j + 1
            col += n_tok
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    return arr(b, s, n, d), arr(b, g, s, d), arr(b, g, s, d), jnp.asarray(seg), arr(b, s, n, d)


PACKED_ROWS = [[7, 13, 1, 9], [40], [], [3, 30], [16, 16, 5]]  # full rows, one long, an empty row, tails


def numpy_causal_attention(q_snd, k_gsd, v_gsd):
    """One sequence, no mask but causality: a float64 numpy reference."""
    s, n, d = q_snd.shape
    r = n // k_gsd.shape[0]
    out = np.zeros((s, n, d))
    for h in range(n):
        scores = q_snd[:, h] @ k_gsd[h // r].T / np.sqrt(d)
        scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[:, h] = (p / p.sum(-1, keepdims=True)) @ v_gsd[h // r]
    return out


def test_xla_packed_equals_each_sequence_alone():
    """The reference's segment mask: every segment's outputs are those of attention over it alone."""
    q, k, v, seg, _ = packed_qkv(PACKED_ROWS, 40)
    out = np.asarray(attn_lib.xla_attention(q, k, v, seg > 0, segment_ids=seg))
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    for i, lengths in enumerate(PACKED_ROWS):
        col = 0
        for n_tok in lengths:
            sl = slice(col, col + n_tok)
            alone = numpy_causal_attention(q[i, sl], k[i, :, sl], v[i, :, sl])
            np.testing.assert_allclose(out[i, sl], alone, atol=TOL, rtol=0)
            col += n_tok


@pytest.mark.parametrize("impl", ["xla_chunked_8x8", "xla_chunked_16x24", "splash_interpret", "cudnn_via_xla"])
def test_packed_backends_match_xla(impl):
    """Outputs on real tokens and q/k/v gradients of a loss over real tokens equal the xla reference on
    packed rows. Small chunked blocks make block pairs whose segments never meet (skipped), and a q
    block of padding only (the empty row's, and tails)."""
    s = 200 if impl.startswith("splash") else 40
    rows = PACKED_ROWS if s == 40 else [[70, 13, 1, 90], [200], [], [3, 130], [16, 160, 5]]
    q, k, v, seg, w = packed_qkv(rows, s)
    real = (seg > 0)[:, :, None, None]
    if impl.startswith("xla_chunked"):
        qb, kb = map(int, impl.rsplit("_", 1)[1].split("x"))
        fn = lambda q, k, v: attn_lib.chunked_attention(q, k, v, seg > 0, q_block=qb, k_block=kb, segment_ids=seg)  # noqa: E731
    elif impl == "splash_interpret":
        fn = lambda q, k, v: attn_lib.splash_attention(q, k, v, seg > 0, block=128, interpret=True, segment_ids=seg)  # noqa: E731
    else:
        fn = lambda q, k, v: attn_lib.cudnn_packed_attention(q, k, v, seg, implementation="xla")  # noqa: E731
    ref_fn = lambda q, k, v: attn_lib.packed_attention(q, k, v, seg, impl="xla")  # noqa: E731
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w * real)  # noqa: E731
    out, ref = jax.jit(fn)(q, k, v), ref_fn(q, k, v)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out * real), np.asarray(ref * real), atol=TOL, rtol=0)
    grads = jax.jit(jax.grad(loss(fn), (0, 1, 2)))(q, k, v)
    ref_grads = jax.grad(loss(ref_fn), (0, 1, 2))(q, k, v)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=0, err_msg=f"d{name}")


def test_chunked_skips_block_pairs_whose_segments_never_meet():
    """Two 16-token segments in a 32-token row, 8-token blocks: the pairs (q block of segment 2, k block
    of segment 1) are skipped; causally live pairs inside a segment are not."""
    seg = jnp.asarray(np.repeat([[1, 2]], 16, axis=1).reshape(1, 32))
    _, _, meet = attn_lib._segment_blocks(seg, 8, 8, 4, 4)
    np.testing.assert_array_equal(np.asarray(meet), np.kron(np.eye(2, dtype=bool), np.ones((2, 2), bool)))


def test_segment_offsets_describe_the_rows():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 3, 0, 0], [1] * 8, [0] * 8], jnp.int32)
    seqlen, offsets = attn_lib.segment_offsets(seg, max_segments=4)
    np.testing.assert_array_equal(seqlen, [[2, 3, 1, -1], [8, -1, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1], [0, -1, -1, -1, -1], [-1, -1, -1, -1, -1]])


def test_model_with_segments_equals_each_sequence_alone():
    """The transformer on a packed row (segments, positions restarting at 0) gives each sequence the
    logits it gets alone (RoPE positions and no attention across segments)."""
    model = tiny_model("xla")
    rng = np.random.default_rng(5)
    lengths = [5, 9, 4]
    tokens = rng.integers(1, TINY["vocab_size"], (1, 20)).astype(np.int32)
    seg = np.zeros((1, 20), np.int32)
    pos = np.zeros((1, 20), np.int32)
    col = 0
    for j, n_tok in enumerate(lengths):
        seg[0, col : col + n_tok], pos[0, col : col + n_tok] = j + 1, np.arange(n_tok)
        col += n_tok
    packed, _ = model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg > 0), segment_ids=jnp.asarray(seg))
    # The same sequences one per row, left-padded (the unpacked layout).
    width = max(lengths)
    rows, valid = np.zeros((len(lengths), width), np.int32), np.zeros((len(lengths), width), bool)
    col = 0
    for i, n_tok in enumerate(lengths):
        rows[i, width - n_tok :], valid[i, width - n_tok :] = tokens[0, col : col + n_tok], True
        col += n_tok
    valid = jnp.asarray(valid)
    alone, _ = model(jnp.asarray(rows), positions_from_valid(valid), valid)
    col = 0
    for i, n_tok in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(packed)[0, col : col + n_tok], np.asarray(alone)[i, width - n_tok :],
                                   atol=1e-5, rtol=1e-5)  # fmt: skip
        col += n_tok
