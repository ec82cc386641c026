"""From prompts to a scored rollout batch: sample, verify on the host, advantages and EchoClips.

The sampler and the advantage/EchoClip maths are jitted; only the reward call
(Python verifiers) runs on the host, on decoded text.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from echorl_jax import sharding
from echorl_jax.rewards import call_verifier, rows_for_batch
from echorl_jax.rewards.base import Verifier
from echorl_jax.rl import echo as echo_lib, objectives, offpolicy
from echorl_jax.sampling.sampler import Rollout, decode_responses


def make_scorer(obj_cfg, echo_cfg, delimiter_ids: np.ndarray, max_new_tokens: int) -> Callable:
    """Jitted ``(rollout, reward_ng) -> (shaped reward, adv_bt, clips)``.

    LUFFY (``obj_cfg.expert_per_group = k > 0``): advantages are over the whole mixed group; the
    expert rows' rewards count for a group's eligibility, but only on-policy rows give EchoClips.
    """
    delims = jnp.asarray(delimiter_ids, jnp.int32)

    @jax.jit
    def score(rollout: Rollout, reward_ng):
        n, g = reward_ng.shape
        if obj_cfg.overlong_buffer > 0:
            shaped = reward_ng.reshape(-1) + objectives.overlong_shaping(rollout.lengths, max_new_tokens, obj_cfg)
            reward_ng = shaped.reshape(n, g)
        adv_bt = objectives.compute_advantages(reward_ng, rollout.response_mask, obj_cfg)
        t = rollout.response_mask.shape[1]
        response_bt = rollout.tokens[:, -t:]
        sampled_bt = rollout.response_mask
        if obj_cfg.expert_per_group > 0:
            expert_b = jnp.asarray(offpolicy.expert_rows(n * g, g, obj_cfg.expert_per_group))
            sampled_bt = sampled_bt & ~expert_b[:, None]
        clips = echo_lib.echo_clips(response_bt, sampled_bt, rollout.entropy, reward_ng, delims, echo_cfg)
        return reward_ng, adv_bt, clips

    return score


class Collected(NamedTuple):
    """One step's rollouts (N groups) and what it cost to get them."""

    rollout: Rollout
    reward_ng: np.ndarray
    correct_ng: np.ndarray
    info: dict[str, float]  # summed verifier counters (+ dynamic_fill_groups with dynamic sampling)
    rounds: int  # prompt batches sampled (> 1 only with DAPO dynamic sampling)
    sampled_tokens: int  # response tokens generated over all rounds, kept or not
    version_bt: Any = None  # int32 [B, T] policy version of each token, when the draws carry one (streaming)


def own_rows(rollout: Rollout, rows_per_process: int) -> Rollout:
    """This process's rows of a (global) rollout on the host: the fields that decoding reads as numpy
    (``tokens``, ``response_mask``, ``lengths``, ``truncated``, ``stop_len``); the others are left as they are."""
    rows = sharding.process_rows(rows_per_process)
    fields = ("tokens", "response_mask", "lengths", "truncated") + (("stop_len",) if rollout.stop_len is not None else ())
    return rollout._replace(**{f: sharding.to_host(getattr(rollout, f))[rows] for f in fields})


def verify(verifier: Verifier, tokenizer, rollout: Rollout, batch, group_size: int,
           records: Sequence[dict] | None = None):
    """Rewards of ``rollout`` (``batch``'s prompts x group_size); ``records`` give row-aware verifiers the
    prompt and extra_info of each row (without them: data_source only).

    Multi-process: ``batch`` holds this process's prompts; it verifies only their rows, and the
    rewards of every process are gathered, so all return the same [N_all, G] arrays and summed counters.
    """
    n = len(batch.ground_truth)
    texts = decode_responses(tokenizer, own_rows(rollout, n * group_size))
    truths = [gt for gt in batch.ground_truth for _ in range(group_size)]
    result = call_verifier(verifier, texts, truths, rows_for_batch(batch, records, group_size))
    info: dict[str, float] = {}
    for part in sharding.gather_objects({k: float(v) for k, v in result.info.items()}):
        for k, v in part.items():
            info[k] = info.get(k, 0.0) + v
    return (
        sharding.gather_rows(np.asarray(result.reward_n, np.float32).reshape(n, group_size)),
        sharding.gather_rows(np.asarray(result.correct_n, bool).reshape(n, group_size)),
        info,
    )


def _take_groups(tree: Any, group_idx: np.ndarray, group_size: int) -> Any:
    rows = (group_idx[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)
    rows = jnp.asarray(rows)
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0), tree)


def collect(
    next_prompts: Callable[[], Any],
    sample: Callable,
    params,
    rng: jax.Array,
    **kwargs,
) -> Collected:
    """Samples and verifies one step's rollouts: round ``i`` samples the next prompt batch with ``params``
    and the key ``fold_in(rng, i)``; the rest is ``collect_from``'s (its keyword arguments)."""

    def draw(rounds: int):
        batch = next_prompts()
        return batch, sample(params, batch.tokens_np, batch.length_n, jax.random.fold_in(rng, rounds)), None

    return collect_from(draw, **kwargs)


def collect_from(
    draw: Callable[[int], tuple[Any, Rollout, Any]],
    *,
    verifier: Verifier,
    tokenizer,
    group_size: int,
    dynamic_sampling: bool,
    echo_threshold: float | None,
    max_rounds: int,
    timings: dict[str, float],
    records: Sequence[dict] | None = None,
    add_experts: Callable[[Rollout, Any], Rollout] | None = None,
) -> Collected:
    """Verifies the groups ``draw(round) -> (prompt batch, rollout, version_bt or None)`` yields, one draw per
    round (a synchronous sampler's batch, or the streaming source's next complete groups).

    With DAPO dynamic sampling, zero-variance groups are dropped and more rounds are
    drawn until N informative groups are collected (at most ``max_rounds``
    draws; any shortfall is filled with dropped groups, counted in the metrics).
    With EchoRL on (``echo_threshold`` set), all-success groups stay: they carry
    the echo signal, and dropping them would switch EchoRL off under DAPO.
    LUFFY: ``draw`` yields ``G - k`` rollouts per prompt and ``add_experts(rollout, batch)``
    appends the ``k`` expert rows of each group before verification (``group_size`` is G); their
    version tags are the group's oldest (``offpolicy.mix_versions``).
    """
    kept_rollouts, kept_rewards, kept_correct, kept_versions, spare = [], [], [], [], []
    info_total: dict[str, float] = {}
    n_target, n_kept, rounds, sampled_tokens = None, 0, 0, 0
    while True:
        t0 = time.perf_counter()
        batch, rollout, version_bt = draw(rounds)
        jax.block_until_ready(rollout.tokens)
        t1 = time.perf_counter()
        sampled_tokens += int(sharding.to_host(rollout.lengths).sum())
        if add_experts is not None:
            sampled_mask = rollout.response_mask
            rollout = add_experts(rollout, batch)
            if version_bt is not None:
                version_bt = offpolicy.mix_versions(version_bt, sampled_mask, rollout.tokens.shape[0] // group_size,
                                                    group_size)  # fmt: skip
        reward_ng, correct_ng, info = verify(verifier, tokenizer, rollout, batch, group_size, records)
        n_target = n_target or reward_ng.shape[0]  # every process's prompts
        timings["sample"] = timings.get("sample", 0.0) + t1 - t0
        timings["reward"] = timings.get("reward", 0.0) + time.perf_counter() - t1
        for k, v in info.items():
            info_total[k] = info_total.get(k, 0.0) + float(v)
        rounds += 1
        if not dynamic_sampling:
            return Collected(rollout, reward_ng, correct_ng, info_total, rounds, sampled_tokens, version_bt)
        keep = np.asarray(objectives.zero_variance_groups(jnp.asarray(reward_ng)))
        if echo_threshold is not None:
            keep = keep | np.all(reward_ng >= echo_threshold, axis=1)
        idx = np.flatnonzero(keep)[: n_target - n_kept]
        kept_rollouts.append(_take_groups(rollout, idx, group_size))
        kept_rewards.append(reward_ng[idx])
        kept_correct.append(correct_ng[idx])
        kept_versions.append(None if version_bt is None else _take_groups(version_bt, idx, group_size))
        n_kept += len(idx)
        if n_kept < n_target:
            spare.append((rollout, reward_ng, correct_ng, version_bt, np.flatnonzero(~keep)))
        if n_kept == n_target or rounds >= max_rounds:
            break
    filled = 0
    for rollout, reward_ng, correct_ng, version_bt, idx in spare:  # fill a shortfall with dropped groups
        idx = idx[: n_target - n_kept]
        if len(idx):
            kept_rollouts.append(_take_groups(rollout, idx, group_size))
            kept_rewards.append(reward_ng[idx])
            kept_correct.append(correct_ng[idx])
            kept_versions.append(None if version_bt is None else _take_groups(version_bt, idx, group_size))
            n_kept += len(idx)
            filled += len(idx)
    info_total["dynamic_fill_groups"] = float(filled)
    rollout = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *kept_rollouts)
    versions = None if kept_versions[0] is None else jnp.concatenate(kept_versions, axis=0)
    return Collected(rollout, np.concatenate(kept_rewards), np.concatenate(kept_correct), info_total, rounds,
                     sampled_tokens, versions)
