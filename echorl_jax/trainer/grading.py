"""Held-out evaluation: avg@k (mean accuracy over k samples) and pass@k, per data source and level."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import jax
import numpy as np

from echorl_jax import sharding
from echorl_jax.data.pipeline import PromptPipeline
from echorl_jax.rewards import call_verifier, rows_for_batch
from echorl_jax.rewards.base import Verifier
from echorl_jax.sampling.sampler import decode_responses
from echorl_jax.trainer.rollout import own_rows


def evaluate(
    sample_fn: Callable,
    params,
    pipeline: PromptPipeline,
    records: Sequence[dict],
    verifier: Verifier,
    tokenizer,
    *,
    k: int,
    rng: jax.Array,
) -> dict[str, float]:
    """One pass over a fresh ``pipeline`` (eval mode); ``sample_fn`` draws ``k`` responses per prompt.

    Keys: ``avg@k``, ``pass@k`` overall, and the same suffixed ``/source=NAME`` and
    ``/level=D`` (records with a ``difficulty`` field). Padding rows are skipped.
    """
    correct = grade(sample_fn, params, pipeline, records, verifier, tokenizer, k=k, rng=rng)
    return summarize(correct, records, k)


def grade(
    sample_fn: Callable,
    params,
    pipeline: PromptPipeline,
    records: Sequence[dict],
    verifier: Verifier,
    tokenizer,
    *,
    k: int,
    rng: jax.Array,
    responses: dict[int, list[str]] | None = None,
) -> dict[int, np.ndarray]:
    """The verdicts ``evaluate`` summarizes: record index -> bool ``[k]`` (one per sampled response).
    ``responses``, if given, is filled with record index -> the ``k`` response texts.

    Sample j of record i draws from the key stream ``i·k + j`` of ``rng`` (``sample_fn``'s ``row_ids``),
    whatever batch and row it lands in: the eval batch size follows the device and host count, and
    the grades do not."""
    correct_by_record: dict[int, np.ndarray] = {}
    for batch in pipeline:
        # Padding rows (record -1) get ids -k..-1, apart from every real one; their rows are discarded.
        row_ids = (np.asarray(batch.record_index, np.int64)[:, None] * k + np.arange(k)).reshape(-1)
        rollout = sample_fn(params, batch.tokens_np, batch.length_n, rng, row_ids=row_ids)
        texts = decode_responses(tokenizer, own_rows(rollout, len(batch.ground_truth) * k))  # this host's rows
        truths = [gt for gt in batch.ground_truth for _ in range(k)]
        rows = rows_for_batch(batch, records, k)
        keep = np.repeat(np.asarray(batch.valid_n, bool), k)  # padding rows are never graded
        idx = np.flatnonzero(keep)
        result = call_verifier(verifier, [texts[i] for i in idx], [truths[i] for i in idx], [rows[i] for i in idx])
        correct_nk = np.zeros(len(texts), bool)
        correct_nk[idx] = np.asarray(result.correct_n, bool)
        # Every host's results (process order), so each summarises the whole eval set.
        correct_nk = sharding.gather_rows(correct_nk.reshape(-1, k))
        record_index, valid_n = sharding.gather_rows(batch.record_index), sharding.gather_rows(batch.valid_n)
        if responses is not None:  # every host's texts too: rows below count over all hosts
            texts = [t for part in sharding.gather_objects(texts) for t in part]
        for row, (idx, valid) in enumerate(zip(record_index, valid_n)):
            if valid:
                correct_by_record[int(idx)] = correct_nk[row]
                if responses is not None:
                    responses[int(idx)] = texts[row * k : (row + 1) * k]
    return correct_by_record


def summarize(correct_by_record: dict[int, np.ndarray], records: Sequence[dict], k: int) -> dict[str, float]:
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for idx, correct in correct_by_record.items():
        rec = records[idx]
        groups[""].append(correct)
        groups[f"/source={rec.get('data_source', 'unknown')}"].append(correct)
        if "difficulty" in rec:
            groups[f"/level={rec['difficulty']}"].append(correct)
    out = {}
    for suffix, rows in sorted(groups.items()):
        c = np.stack(rows)
        out[f"avg@{k}{suffix}"] = float(c.mean())
        # Standard error of avg@k over prompts (each prompt's k samples averaged first): its noise.
        per_prompt = c.mean(axis=1)
        out[f"stderr/avg@{k}{suffix}"] = float(per_prompt.std(ddof=1) / np.sqrt(len(rows))) if len(rows) > 1 else 0.0
        out[f"pass@{k}{suffix}"] = float(c.any(axis=1).mean())
        out[f"count{suffix}"] = float(len(rows))
    return out
