"""The loop's two parts: the rollout source's version tags and the learning step's staleness metric."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from echorl_jax import sharding
from echorl_jax.trainer import learn_step, rollout_source, setup as setup_lib
from tests.test_train import tiny_cfg


def test_max_lag_is_the_learner_version_less_the_oldest_tag_under_the_mask():
    version_bt = np.array([[7, 7, 7], [5, 5, 1], [6, 2, 2]], np.int32)
    mask_bt = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0]], bool)  # the 1 and the 2s are padding
    assert int(rollout_source.max_lag(version_bt, mask_bt, 7)) == 2  # row 1's 5s
    assert int(rollout_source.max_lag(version_bt, mask_bt | (version_bt == 1), 7)) == 6
    assert int(rollout_source.max_lag(version_bt, np.zeros_like(mask_bt), 7)) == 0  # no token: no lag


def test_sync_source_tags_every_token_with_the_step_s_version_and_the_learner_reports_older_tags(tmp_path):
    """Learning step s samples with version s - 1 (the learning steps applied); a batch whose tags are older
    than the learner's version reports how much older in ``staleness/max_lag``."""
    assert [rollout_source.policy_version(s) for s in (1, 2, 5)] == [0, 1, 4]
    s = setup_lib.build_setup(tiny_cfg(tmp_path / "w", train={"steps": 3}), log=lambda _: None)
    source = rollout_source.SyncSource(s)
    learn = learn_step.make_learn_step(s, s.state)
    batch = source.next(s.state.params, 3)
    tags = sharding.to_host(batch.version_bt)
    assert tags.shape == sharding.to_host(batch.rollout.response_mask).shape and tags.dtype == np.int32
    assert (tags == 2).all()
    # Rows 4..7 sampled two versions earlier (as a streaming source with k >= 2 may hand over).
    older = batch._replace(version_bt=batch.version_bt - 2 * (jnp.arange(tags.shape[0]) // 4 == 1)[:, None])
    state, metrics, skipped = learn(s.state, older, 3)
    assert int(metrics["staleness/max_lag"]) == 2
    assert skipped == [0.0] and int(state.step) == 1
    state, metrics, _ = learn(state, source.next(state.params, 4), 4)
    assert int(metrics["staleness/max_lag"]) == 0
