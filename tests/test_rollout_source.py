"""The loop's two parts: the rollout source's version tags and the learning step's staleness metrics and bound."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from echorl_jax import sharding
from echorl_jax.trainer import learn_step, rollout_source, setup as setup_lib
from tests.test_train import tiny_cfg


def _lags_by_loop(version_bt, mask_bt, learner, bound):
    counts = [0] * (bound + 2)
    for v, m in zip(version_bt.ravel(), mask_bt.ravel()):
        if m:
            counts[min(max(learner - v, 0), bound + 1)] += 1
    return counts


def test_lag_histogram_counts_loss_tokens_by_versions_behind_the_learner():
    rng = np.random.default_rng(0)
    version_bt = rng.integers(0, 8, (6, 9)).astype(np.int32)
    mask_bt = rng.random((6, 9)) < 0.6
    for bound in (0, 1, 3):
        got = rollout_source.lag_histogram(version_bt, mask_bt, 7, bound).tolist()
        assert got == _lags_by_loop(version_bt, mask_bt, 7, bound)
    version_bt = np.array([[7, 7, 7], [5, 5, 1], [6, 2, 2]], np.int32)
    mask_bt = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0]], bool)  # the 1 and the 2s are padding
    m = rollout_source.staleness_metrics(version_bt, mask_bt, 8, 2)  # step 8 learns from version 7
    assert m["staleness/max_lag"] == 2 and m["staleness/lag0_frac"] == 0.4 and m["staleness/lag2_frac"] == 0.4
    with pytest.raises(rollout_source.StalenessError, match="2 loss tokens are more than rl.max_staleness=1"):
        rollout_source.staleness_metrics(version_bt, mask_bt, 8, 1)
    assert rollout_source.staleness_metrics(version_bt, np.zeros_like(mask_bt), 8, 0)["staleness/max_lag"] == 0


def test_sync_source_tags_every_token_with_the_step_s_version_and_the_learner_refuses_older_tags(tmp_path):
    """Learning step s samples with version s - 1 (the learning steps applied); a batch with tokens older
    than the bound allows stops the learner (a source's bug, never trained on silently)."""
    assert [rollout_source.policy_version(s) for s in (1, 2, 5)] == [0, 1, 4]
    s = setup_lib.build_setup(tiny_cfg(tmp_path / "w", train={"steps": 3}), log=lambda _: None)
    source = rollout_source.SyncSource(s)
    learn = learn_step.make_learn_step(s, s.state)
    batch = source.next(s.state.params, 3)
    tags = sharding.to_host(batch.version_bt)
    assert tags.shape == sharding.to_host(batch.rollout.response_mask).shape and tags.dtype == np.int32
    assert (tags == 2).all()
    # Rows 4..7 sampled two versions earlier: past rl.max_staleness = 0, the learner refuses them.
    older = batch._replace(version_bt=batch.version_bt - 2 * (jnp.arange(tags.shape[0]) // 4 == 1)[:, None])
    with pytest.raises(rollout_source.StalenessError, match="rl.max_staleness=0"):
        learn(s.state, older, 3)
    state, metrics, skipped = learn(s.state, batch, 3)
    assert int(metrics["staleness/max_lag"]) == 0 and metrics["staleness/lag0_frac"] == 1.0
    assert skipped == [0.0] and int(state.step) == 1
