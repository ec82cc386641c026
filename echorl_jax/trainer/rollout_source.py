"""Where the learner's batches come from: a rollout source yields scored groups tagged with policy versions.

The RL loop (trainer/train.py) has two parts: a rollout source, ``source.next(params, step) -> ScoredBatch``,
and the learning step that consumes the batch (trainer/learn_step.py). The synchronous source below samples
each batch with the learner's parameters as they are; streaming sources (DESIGN.md §8: rollouts carried across
steps, or a sampler mesh feeding a queue) are other sources behind the same call, not a second loop.

**Policy versions.** A version counts the learning steps whose updates the parameters hold: a run's initial
parameters are version 0, learning step ``s`` starts from version ``policy_version(s) = s - 1`` and its
``rl.epochs × rl.minibatches`` optimizer updates make version ``s`` (a checkpoint of step ``s`` holds version
``s``, so a resumed run continues the count). Every response token carries the version of the parameters that
sampled it (``ScoredBatch.version_bt``), and a learner at version ``V`` reads a token's staleness as
``V - v_t``: a bound ``V - v_t <= k`` then makes ``k = 0`` the synchronous trainer exactly. Counting learning
steps rather than optimizer updates keeps the tags independent of how a step splits into mini-batches.
LUFFY's expert rows are sampled by no policy; they carry the version of the on-policy rows of their group
(here: the batch's), so a staleness bound keeps or drops a group whole and never an expert row alone.

The synchronous source keeps no state of its own: its position in the prompt stream is the train data
pipeline's state, which checkpoints hold and restore as before (trainer/train.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from echorl_jax import sharding
from echorl_jax.rl import echo as echo_lib, offpolicy
from echorl_jax.sampling.layout import DecodeWeights
from echorl_jax.sampling.sampler import Rollout
from echorl_jax.trainer import rollout as rollout_lib
from echorl_jax.trainer.setup import Setup


class ScoredBatch(NamedTuple):
    """One learning step's input: N scored groups, ``B = N·G`` rows group-major (``b = n·G + g``)."""

    rollout: Rollout  # [B, ...] tokens, masks, behaviour log-probs, entropy, lengths
    reward_ng: jax.Array  # f32 the reward the advantages saw (DAPO: with overlong shaping)
    correct_ng: np.ndarray  # bool verified correct (every process's rows)
    adv_bt: jax.Array  # f32 advantages
    clips: echo_lib.EchoClips  # EchoRL's clips of the all-success groups
    version_bt: jax.Array  # int32 policy version that sampled each response token (read under response_mask)
    info: dict[str, float]  # summed verifier counters (+ dynamic_fill_groups with dynamic sampling)
    rounds: int  # prompt batches sampled (> 1 only with DAPO dynamic sampling)
    sampled_tokens: int  # response tokens generated over all rounds, kept or not
    timings: dict[str, float]  # seconds spent sampling and verifying ("sample", "reward"), all rounds
    source_metrics: dict | None = None  # the source's own metrics (streaming: stream/*, sampler/*)


class RolloutSource(Protocol):
    def next(self, params, step: int) -> ScoredBatch:
        """The batch learning step ``step`` consumes; ``params``: the learner's now (``policy_version(step)``)."""
        ...

    def checkpoint(self) -> tuple[Any, dict]:
        """What a checkpoint keeps of the source: (device arrays or None, a JSON dict)."""
        ...

    def restore(self, read_arrays, params, host: dict) -> None:
        """Continues from a checkpoint's JSON dict; ``read_arrays(target)`` reads its arrays onto ``target``."""
        ...


def policy_version(step: int) -> int:
    """The version learning step ``step`` starts from: the learning steps whose updates it holds."""
    return step - 1


def _tag_tokens(mask_bt: jax.Array, version) -> jax.Array:
    """int32 ``[B, T]``: ``version`` everywhere, rows laid out like the batch's."""
    return sharding.constrain_rows(jnp.full(mask_bt.shape, version, jnp.int32))


@jax.jit(static_argnames="bound")
def lag_histogram(version_bt: jax.Array, mask_bt: jax.Array, learner_version, bound: int) -> jax.Array:
    """int32 ``[bound + 2]``: tokens under ``mask_bt`` that are 0, 1, ..., ``bound`` versions behind
    ``learner_version``, then those further behind (the bound's violations: must be 0)."""
    lag_bt = jnp.clip(learner_version - version_bt, 0, bound + 1)
    return jnp.sum(mask_bt[..., None] & (lag_bt[..., None] == jnp.arange(bound + 2)), axis=(0, 1), dtype=jnp.int32)


class StalenessError(RuntimeError):
    """A token older than ``rl.max_staleness`` versions reached a loss (a bug in a rollout source)."""


def staleness_metrics(version_bt, mask_bt, step: int, bound: int) -> dict[str, float]:
    """``staleness/lag{j}_frac``: the share of loss tokens ``j`` versions old (j = 0..bound), and
    ``staleness/max_lag``; raises ``StalenessError`` when a loss token is older than ``bound``."""
    counts = np.asarray(lag_histogram(version_bt, mask_bt, policy_version(step), bound))
    total = max(int(counts.sum()), 1)
    if counts[-1]:
        raise StalenessError(f"step {step}: {int(counts[-1])} loss tokens are more than rl.max_staleness={bound} "
                             f"policy versions old (learner at version {policy_version(step)})")
    lags = np.flatnonzero(counts)
    out = {f"staleness/lag{j}_frac": counts[j] / total for j in range(bound + 1)}
    out["staleness/max_lag"] = float(lags.max()) if len(lags) else 0.0
    return out


def push_weights(s: Setup, sampler, params, version: int) -> DecodeWeights:
    """``sampler``'s weights for a TrainState's ``params`` at policy ``version``: the decode copy, or with a
    sampler mesh of its own (``mesh.sampler_devices``) the push to it, checked to have landed."""
    weights = s.decode_weights(sampler, params, version)
    sampler.layout.check_landed(weights, version)
    return weights


def verify_args(s: Setup, timings: dict[str, float]) -> dict[str, Any]:
    """``rollout.collect_from``'s keyword arguments for the run ``s`` (verifier, DAPO rounds, EchoRL's
    eligibility, LUFFY's experts): the same for every source."""
    cfg = s.cfg
    return dict(verifier=s.verifier, tokenizer=s.tokenizer, group_size=cfg.rl.group_size,
                dynamic_sampling=cfg.objective.dynamic_sampling,
                echo_threshold=cfg.echo.success_threshold if cfg.echo.enabled else None,
                max_rounds=cfg.rl.max_sample_rounds, timings=timings, records=s.train_records,
                add_experts=s.experts.add_to if s.experts is not None else None)  # fmt: skip


class SyncSource:
    """Synchronous rollouts: each step's batch is sampled with the learner's parameters as they are (every
    token at ``policy_version(step)``), verified on the host and scored (advantages + EchoClips). Step ``s``
    samples with ``fold_in(key(train.seed), s)``, so a resumed run draws what the straight run drew."""

    def __init__(self, s: Setup):
        cfg = s.cfg
        self.s = s
        self.score = rollout_lib.make_scorer(cfg.objective, cfg.echo, s.delimiter_ids, cfg.sampling.max_new_tokens)
        self.tag = jax.jit(sharding.traced_on(s.mesh, _tag_tokens))
        self.base_key = jax.random.key(cfg.train.seed)

    def next(self, params, step: int) -> ScoredBatch:
        s, cfg = self.s, self.s.cfg
        timings: dict[str, float] = {}
        # The sampler decodes from a copy in the compute dtype and decode layout (sampling/layout.py),
        # made once per step; collect() holds the only reference, so it is freed once sampling is done.
        # LoRA: the adapted model (adapters + frozen base) as it is, no merged weights; the base's copy is kept.
        got = rollout_lib.collect(
            lambda: next(s.train_pipeline), s.sample, push_weights(s, s.sample, params, policy_version(step)),
            jax.random.fold_in(self.base_key, step), **verify_args(s, timings))
        ro = got.rollout
        reward_ng, adv_bt, clips = self.score(ro, jnp.asarray(got.reward_ng))  # reward_ng: every process's rows
        version_bt = self.tag(ro.response_mask, policy_version(step))
        metrics = {}
        if got.rounds == 1 and s.sample.last_decode_steps is not None:  # the one sampler call's decode loop
            rows = s.sample.plans[cfg.data.max_prompt_len].rows(ro.tokens.shape[0] - s.cfg.objective.expert_per_group
                                                                * reward_ng.shape[0])[0]  # fmt: skip
            steps = int(s.sample.last_decode_steps)
            metrics = {"sampler/decode_steps": float(steps),
                       "sampler/slot_occupancy": got.sampled_tokens / max(steps * rows, 1)}  # fmt: skip
        return ScoredBatch(rollout=ro, reward_ng=reward_ng, correct_ng=got.correct_ng, adv_bt=adv_bt, clips=clips,
                           version_bt=version_bt, info=got.info, rounds=got.rounds,
                           sampled_tokens=got.sampled_tokens, timings=timings, source_metrics=metrics)  # fmt: skip

    def checkpoint(self) -> tuple[Any, dict]:
        return None, {}  # its place in the prompt stream is the train pipeline's state, saved by the loop

    def restore(self, read_arrays, params, host: dict) -> None:
        pass


def rollout_metrics(ro, reward_ng, correct_ng, clips, info, rounds, num_expert: int = 0) -> dict[str, Any]:
    """Rollout metrics (every process computes the same from the gathered arrays); with LUFFY
    (``num_expert = k``) reward, accuracy and lengths are the on-policy rows' (what the policy does),
    the expert rows' under ``expert/``."""
    n, g = reward_ng.shape
    zero_std = np.all(reward_ng == reward_ng[:, :1], axis=1)  # of the mixed group: what the advantage sees
    has_clip = sharding.to_host(clips.mask_bt).reshape(n, -1).any(axis=1)
    on_b = ~offpolicy.expert_rows(n * g, g, num_expert)
    all_lengths = sharding.to_host(ro.lengths)
    mask = sharding.to_host(ro.response_mask)[on_b]
    lengths = all_lengths[on_b]
    entropy = sharding.to_host(ro.entropy)[on_b]
    truncated = sharding.to_host(ro.truncated)[on_b]
    if num_expert:
        expert = {"expert/reward_mean": reward_ng[:, g - num_expert :].mean(),
                  "expert/accuracy": correct_ng[:, g - num_expert :].mean(),
                  "expert/len_mean": all_lengths[~on_b].mean()}  # fmt: skip
        reward_ng, correct_ng = reward_ng[:, : g - num_expert], correct_ng[:, : g - num_expert]
    m = {
        "reward/mean": reward_ng.mean(),
        "reward/std": reward_ng.std(),
        "accuracy": correct_ng.mean(),
        "groups/zero_std_frac": zero_std.mean(),
        "response/len_mean": lengths.mean(),
        "response/len_max": lengths.max(),
        "response/clip_ratio": truncated.mean(),
        "entropy/mean": (entropy * mask).sum() / max(mask.sum(), 1),
        # prompts whose only learning signal this step is the echo term
        "echo/only_signal_frac": (zero_std & has_clip).mean(),
        "sample_rounds": rounds,
    }
    m.update({f"echo/{k}": v for k, v in clips.metrics.items()})
    m.update({f"reward_info/{k}": v for k, v in info.items()})
    if num_expert:
        m.update(expert)
    return m
