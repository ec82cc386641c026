"""Packed learner batches (rl/packing.py): the host placement against a slow reference, the device
index and gather against a numpy layout, and every loss on packed rows equal to the padded one."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echorl_jax import sharding
from echorl_jax.rl import echo as echo_lib, objectives, packing
from echorl_jax.rl.segments import ROWS

MAX_SEG = 64


def random_lengths(rng, b, s, kind):
    if kind == "long":  # every row longer than half a packed row: one per row
        return rng.integers(s // 2 + 1, s + 1, b)
    if kind == "tail":  # log-normal, median s/5
        return np.clip(np.exp(rng.normal(np.log(s / 5), 1.0, b)).astype(int), 2, s)
    return rng.integers(2, s + 1, b)


def ffd_rows(lengths, L, max_seg):
    """Slow first-fit-decreasing: the list of rows, each a list of rollout rows."""
    rows, free = [], []
    for b in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for j, row in enumerate(rows):
            if free[j] >= lengths[b] and len(row) < max_seg:
                row.append(b)
                free[j] -= lengths[b]
                break
        else:
            rows.append([b])
            free.append(L - lengths[b])
    return rows


@pytest.mark.parametrize("kind", ["mixed", "long", "tail"])
@pytest.mark.parametrize("devices,k,b", [(1, 1, 12), (4, 2, 32), (8, 3, 48)])
def test_plan_places_whole_sequences_balanced(kind, devices, k, b):
    rng = np.random.default_rng(devices * 100 + k)
    s = 40
    spec = packing.make_spec(b, s, s - 8, k, devices=devices)
    assert spec.rows_per_device == min(k, b // devices)
    lengths = random_lengths(rng, b, s, kind)
    dest = packing.plan_rows(lengths, spec)
    L, R = spec.row_len, spec.rows_per_micro_batch
    flat_row, offset = dest // L, dest % L
    assert (offset + lengths <= L).all(), "a sequence crosses the end of its row"
    assert flat_row.max() < spec.num_micro_batches * R
    occupied = {}
    for b_, (r, o, n) in enumerate(zip(flat_row, offset, lengths)):
        for col in range(o, o + n):
            assert (r, col) not in occupied, f"rows {b_} and {occupied[(r, col)]} overlap"
            occupied[(r, col)] = b_
    by_row = {}
    for r, o in zip(flat_row, offset):
        by_row.setdefault(r, []).append(o)
    for offs in by_row.values():  # contiguous from column 0 (the segment layout cuDNN takes)
        offs.sort()
        assert offs[0] == 0 and len(offs) <= MAX_SEG
    assert len(by_row) == len(ffd_rows(list(lengths), L, MAX_SEG)), "not first-fit-decreasing's row count"
    device = (flat_row % R) // spec.rows_per_device
    rows_d = np.array([len({r for r, d in zip(flat_row, device) if d == dd}) for dd in range(devices)])
    assert rows_d.max() <= -(-len(by_row) // devices), f"rows per device {rows_d} not balanced"
    assert packing.micro_batches_used(dest, spec) == -(-rows_d.max() // spec.rows_per_device)


def test_plan_segment_cap_and_bad_lengths():
    spec = packing.make_spec(8, 40, 32, 1, devices=1)
    dest = packing.plan_rows(np.full(8, 2), spec, max_segments=3)
    assert np.bincount(dest // 40).max() == 3
    with pytest.raises(ValueError, match="row lengths must be in"):
        packing.plan_rows(np.full(8, 41), spec)
    with pytest.raises(ValueError, match="at least one row"):
        packing.make_spec(8, 40, 32, 0, devices=1)


# ----------------------------------------------------------------------------- index, gather, unpack


def rollout_rows(rng, b, p, t, kind="mixed"):
    """Left-padded prompts, responses from column p: ``(tokens, valid)`` and each row's real length."""
    s = p + t
    plen = rng.integers(1, p + 1, b)
    rlen = np.clip(random_lengths(rng, b, t + 1, kind) - 1, 1, t)
    tokens = rng.integers(1, 50, (b, s)).astype(np.int32)
    valid = np.zeros((b, s), bool)
    for i in range(b):
        valid[i, p - plen[i] : p + rlen[i]] = True
    return tokens, valid


def numpy_layout(tokens, valid, dest, spec):
    """The packed layout built directly: tokens, segment ids, positions, [C, R, L] each."""
    C, R, L = spec.num_micro_batches, spec.rows_per_micro_batch, spec.row_len
    out = {k: np.zeros(C * R * L, np.int32) for k in ("tokens", "segment", "position", "seq")}
    out["seq"][:] = len(tokens)
    order = np.argsort(dest)
    seg_of_row = {}
    for b in order:
        row = dest[b] // L
        seg_of_row[row] = seg_of_row.get(row, 0) + 1
        real = tokens[b][valid[b]]
        sl = slice(dest[b], dest[b] + len(real))
        out["tokens"][sl], out["segment"][sl] = real, seg_of_row[row]
        out["position"][sl], out["seq"][sl] = np.arange(len(real)), b
    return {k: v.reshape(C, R, L) for k, v in out.items()}


def test_index_and_gather_match_numpy_layout():
    rng = np.random.default_rng(0)
    b, p, t = 16, 6, 20
    tokens, valid = rollout_rows(rng, b, p, t)
    resp = rng.standard_normal((b, t)).astype(np.float32)
    mesh = sharding.make_mesh((-1, 1, 1))
    spec = packing.make_spec(b, p + t, t, 1, mesh)  # one row per device per micro-batch
    dest = packing.plan_rows(valid.sum(1), spec)
    ref = numpy_layout(tokens, valid, dest, spec)

    @jax.jit
    def run(tokens, valid, resp, dest):
        place = packing.placement(dest, valid)
        return packing.map_packed(lambda mb, index: (mb, index), {"tok": tokens, "resp": resp}, place, spec)

    mb, index = run(tokens, valid, resp, packing.put_plan(dest, mesh))
    used = np.zeros(spec.num_micro_batches, bool)
    used[np.unique(dest // spec.tokens_per_micro_batch)] = True
    np.testing.assert_array_equal(np.asarray(mb["tok"])[used], ref["tokens"][used])
    np.testing.assert_array_equal(np.asarray(index.segment_bt)[used], ref["segment"][used])
    np.testing.assert_array_equal(np.asarray(index.position_bt)[used], ref["position"][used])
    np.testing.assert_array_equal(np.asarray(index.seq_bt)[used], ref["seq"][used])
    # A [B, T] field lands on the response tokens: the value of (b, t) at the token of column p + t.
    want = np.zeros_like(ref["tokens"], np.float32).reshape(-1)
    for i in range(b):
        cols = np.flatnonzero(valid[i])
        for j, col in enumerate(cols):
            if col >= p:
                want[dest[i] + j] = resp[i, col - p]
    np.testing.assert_array_equal(np.asarray(mb["resp"]).reshape(-1), want)
    # unpack inverts the gather on the real response tokens
    back = jax.jit(lambda x, d, v: packing.unpack(x, packing.placement(d, v), t, spec))(mb["resp"], dest, valid)
    np.testing.assert_array_equal(np.asarray(back), np.where(valid[:, p:], resp, 0))


def test_gather_refuses_a_field_it_cannot_place():
    spec = packing.make_spec(4, 10, 6, 1, devices=1)
    index = packing.PackedIndex(*(jnp.zeros((4, 10), jnp.int32) for _ in range(4)))
    with pytest.raises(ValueError, match=r"\['weights'\].*\(4, 11\)"):
        packing.gather({"weights": jnp.zeros((4, 11))}, index, spec)


# ----------------------------------------------------------------------------- losses, packed vs padded


def loss_inputs(rng, b, p, t, g=4, kind="mixed"):
    tokens, valid = rollout_rows(rng, b, p, t, kind)
    mask = valid[:, p:].copy()
    adv = np.where(mask, np.repeat(rng.standard_normal(b // g), g)[:, None], 0).astype(np.float32)
    f = lambda scale, shift: (shift + scale * rng.standard_normal((b, t))).astype(np.float32)  # noqa: E731
    echo = np.zeros((b, t), bool)
    for i in range(0, b, g):  # a clip prefix in the first row of every group
        echo[i, : rng.integers(1, t)] = True
    off = np.zeros((b, t), bool)
    off[g - 1 :: g] = True  # LUFFY: the last row of each group is an expert row
    batch = objectives.LossBatch(mask, adv, f(0.3, -3.0), f(0.3, -3.0), echo & mask, off & mask)
    return tokens, valid, batch, f(0.3, -3.0), np.abs(f(1.0, 2.0))


# Every aggregation with the PPO clip and with GSPO's sequence ratio (a segment reduction), the other
# surrogates, KL, the entropy bonus; LUFFY's expert tokens in half of them; EchoRL in all.
CASES = [
    dict(aggregation=a, policy_loss=pl, luffy=(i + j) % 2 == 1)
    for i, a in enumerate(objectives.AGGREGATIONS)
    for j, pl in enumerate(("ppo", "gspo"))
] + [
    dict(policy_loss="gspo_token", aggregation="seq-mean-token-mean", kl_coef=0.1, entropy_coef=0.01, luffy=True),
    dict(policy_loss="cispo", aggregation="seq-mean-token-sum-norm", norm_length=0, luffy=False),
    dict(policy_loss="ppo", aggregation="token-mean", kl_coef=0.05, kl_kind="k2", dual_clip=3.0, luffy=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_loss_and_gradient_packed_equal_padded(case):
    """total_loss (policy, KL, entropy, echo, LUFFY expert tokens, every metric) and its gradient with
    respect to the per-token log-probs: packed rows with Segments == padded rows."""
    case = dict(case)
    luffy = case.pop("luffy")
    rng = np.random.default_rng(zlib.crc32(repr(sorted(case.items())).encode()))
    b, p, t = 16, 5, 24
    tokens, valid, batch, logp, entropy = loss_inputs(rng, b, p, t)
    if not luffy:
        batch = batch._replace(offpolicy_bt=None)
    obj = objectives.ObjectiveConfig(expert_per_group=1 if luffy else 0, **case).validate()
    echo = echo_lib.EchoConfig(enabled=True, coef=0.3)
    counts = objectives.global_counts(batch.mask_bt, batch.echo_mask_bt, batch.offpolicy_bt)
    spec = packing.make_spec(b, p + t, t, 2, devices=2)  # 2 rows per device, several micro-batches
    dest = packing.plan_rows(valid.sum(1), spec)
    assert packing.micro_batches_used(dest, spec) >= 2

    def padded(logp, entropy):
        return objectives.total_loss(logp, entropy, batch, counts, obj, echo)

    def packed(logp, entropy):
        fields = {"logp": logp, "entropy": entropy, "batch": batch}
        place = packing.placement(dest, valid)

        def one(carry, mb, index):
            loss, metrics = objectives.total_loss(mb["logp"], mb["entropy"], mb["batch"], counts, obj, echo,
                                                  spec.layout(index))  # fmt: skip
            return carry[0] + loss, jax.tree.map(jnp.add, carry[1], metrics)

        zero = jax.tree.map(jnp.zeros_like, padded(logp, entropy))
        return packing.scan_packed(one, zero, fields, place, spec)

    grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))  # noqa: E731
    (l_pad, m_pad), g_pad = grad(padded)(logp, entropy)
    (l_pk, m_pk), g_pk = grad(packed)(logp, entropy)
    # Relative 1e-5; the values are sums of O(1) per-token terms of both signs (advantages ~ N(0, 1)) that
    # may cancel, so 1e-6 absolute on top (float32 sums of a few hundred terms in another order).
    np.testing.assert_allclose(l_pk, l_pad, rtol=1e-5, atol=1e-6)
    for k in m_pad:
        np.testing.assert_allclose(m_pk[k], m_pad[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for name, gp, gu in zip(("logp", "entropy"), g_pk, g_pad):
        scale = np.abs(np.asarray(gu)).max()
        np.testing.assert_allclose(np.asarray(gp), np.asarray(gu), rtol=1e-5, atol=1e-6 * scale, err_msg=name)
    assert np.abs(np.asarray(g_pad[0])).max() > 0  # the comparison is not between zeros


def test_rows_layout_is_the_row_reduction():
    x = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(ROWS.seq_sum(x), x.sum(1))
    assert ROWS.to_tokens(ROWS.seq_sum(x)).shape == (3, 1) and ROWS.response_len(x) == 4
