"""DAPO dynamic sampling in rollout.collect, against hand-worked expectations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from echorl_jax.data.pipeline import PromptBatch
from echorl_jax.rewards.base import RewardResult
from echorl_jax.sampling.sampler import Rollout
from echorl_jax.trainer.rollout import collect

N, G, T = 4, 2, 3


def fake_sample(params, tokens_np, lengths, rng):
    """Row b of draw r carries token id 100*r + group index, so kept groups can be traced."""
    group = tokens_np[:, 0]  # the batch's prompt ids encode (draw, group)
    rows = np.repeat(group, G)
    tok = jnp.asarray(np.tile(rows[:, None], (1, 2 + T)), jnp.int32)
    b = N * G
    return Rollout(tok, jnp.ones((b, 2 + T), bool), jnp.ones((b, T), bool), jnp.zeros((b, T)), jnp.zeros((b, T)),
                   jnp.full((b,), T, jnp.int32), jnp.zeros((b,), bool))  # fmt: skip


class Draws:
    """Yields prompt batches; each draw's rewards per group are scripted."""

    def __init__(self, rewards_per_draw):
        self.rewards = [np.asarray(r, np.float32) for r in rewards_per_draw]
        self.i = 0

    def next(self):
        ids = np.array([[100 * self.i + n] for n in range(N)], np.int32)
        batch = PromptBatch(ids, np.ones(N, np.int32), [str(self.i)] * N, ["x"] * N, np.arange(N), np.ones(N, bool))
        self.i += 1
        return batch


class ScriptedVerifier:
    def __init__(self, draws: Draws):
        self.draws = draws

    def __call__(self, responses, ground_truths):
        r = self.draws.rewards[int(ground_truths[0])].reshape(-1)
        return RewardResult(r, r > 0.5, {})


class FakeTokenizer:
    def batch_decode(self, rows, **_):
        return ["" for _ in rows]

    def decode(self, row, **_):
        return ""


def run(rewards_per_draw, dynamic, echo_threshold, max_rounds=3):
    draws = Draws(rewards_per_draw)
    return collect(
        draws.next, fake_sample, None, jax.random.key(0), verifier=ScriptedVerifier(draws), tokenizer=FakeTokenizer(),
        group_size=G, dynamic_sampling=dynamic, echo_threshold=echo_threshold, max_rounds=max_rounds, timings={},
    )  # fmt: skip


def groups_of(rollout):
    return np.asarray(rollout.tokens[::G, 0]).tolist()


MIXED, ALL1, ALL0 = [0, 1], [1, 1], [0, 0]


def test_without_dynamic_sampling_first_draw_is_used_as_is():
    ro, reward, _, _, rounds, *_ = run([[ALL1, ALL0, MIXED, ALL1]], dynamic=False, echo_threshold=None)
    assert rounds == 1 and groups_of(ro) == [0, 1, 2, 3]
    np.testing.assert_array_equal(reward, [ALL1, ALL0, MIXED, ALL1])


def test_dynamic_sampling_refills_with_informative_groups_in_order():
    draws = [[ALL1, MIXED, ALL0, ALL0], [MIXED, ALL1, MIXED, ALL0], [MIXED, MIXED, MIXED, MIXED]]
    ro, reward, _, info, rounds, *_ = run(draws, dynamic=True, echo_threshold=None)
    # draw 0 keeps group 1; draw 1 keeps 100, 102; draw 2 keeps 200 to reach N = 4.
    assert groups_of(ro) == [1, 100, 102, 200] and rounds == 3
    assert np.all(reward.std(axis=1) > 0)
    assert info["dynamic_fill_groups"] == 0


def test_echo_keeps_all_success_groups_under_dapo():
    ro, reward, _, _, rounds, *_ = run([[ALL1, MIXED, ALL0, ALL1], [MIXED] * 4], dynamic=True, echo_threshold=1.0)
    assert groups_of(ro) == [0, 1, 3, 100] and rounds == 2


def test_shortfall_after_max_rounds_is_filled_with_dropped_groups_and_counted():
    ro, reward, _, info, rounds, *_ = run([[ALL0, MIXED, ALL0, ALL1], [ALL0] * 4], dynamic=True, echo_threshold=None,
                                      max_rounds=2)  # fmt: skip
    assert rounds == 2 and groups_of(ro)[0] == 1 and len(groups_of(ro)) == N
    assert info["dynamic_fill_groups"] == 3


def test_sampled_tokens_count_every_round_not_only_kept_rows():
    """tokens/s must divide every generated token by the time of every round (DAPO draws several)."""
    out = run([[ALL0, MIXED, ALL0, ALL1], [MIXED] * 4], dynamic=True, echo_threshold=None)
    assert out.rounds == 2 and out.sampled_tokens == 2 * N * G * T
    assert int(np.asarray(out.rollout.lengths).sum()) == N * G * T  # the kept rows: one round's worth
