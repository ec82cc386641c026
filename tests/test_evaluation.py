"""evaluation.summarize against a slow per-prompt loop: avg@k, pass@k, counts and the standard error;
held-out samples that do not depend on the eval batch (device count)."""

import math
import os

import jax
import numpy as np
import pytest

from echorl_jax import config as config_lib
from echorl_jax.trainer.grading import grade, summarize
from echorl_jax.trainer.setup import build_setup


def test_summarize_matches_a_slow_reference():
    rng = np.random.default_rng(0)
    k, n = 4, 37
    records = [{"data_source": "a" if i % 3 else "b", "difficulty": 1 + i % 2} for i in range(n)]
    correct = {i: rng.random(k) < 0.3 + 0.4 * (i % 2) for i in range(n)}
    out = summarize(correct, records, k)
    for name, members in [("", range(n)), ("/source=a", [i for i in range(n) if i % 3]),
                          ("/level=2", [i for i in range(n) if i % 2])]:  # fmt: skip
        accs = [sum(correct[i]) / k for i in members]
        mean = sum(accs) / len(accs)
        sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1))
        assert math.isclose(out[f"avg@{k}{name}"], mean, rel_tol=1e-12)
        assert math.isclose(out[f"pass@{k}{name}"], sum(any(correct[i]) for i in members) / len(accs))
        assert math.isclose(out[f"stderr/avg@{k}{name}"], sd / math.sqrt(len(accs)), rel_tol=1e-9)
        assert out[f"count{name}"] == len(accs)


TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_test.py")


def _graded(devices: int, prompts_per_step: int, slots: int = 0):
    """Held-out responses and verdicts of the tiny run's random-init policy (arith task, 10 records, k = 2,
    temperature 0.6) on the first ``devices`` devices, whose eval batch is max(devices, prompts_per_step)."""
    cfg = config_lib.build_config(config_lib.load_config_file(TINY), {
        "mesh": {"num_devices": devices}, "rl": {"prompts_per_step": prompts_per_step},
        "data": {"num_eval_per_level": 5}, "sampling": {"slots": slots}, "sft": {"steps": 0}})  # fmt: skip
    s = build_setup(cfg, log=lambda _: None)
    texts: dict[int, list[str]] = {}
    verdicts = grade(s.eval_sample, s.decode_weights(s.eval_sample, s.state.params), s.eval_pipeline, s.eval_records,
                     s.verifier, s.tokenizer, k=2, rng=jax.random.key(3), responses=texts)  # fmt: skip
    return s.eval_pipeline.batch_size, texts, {i: v.tolist() for i, v in verdicts.items()}


@pytest.mark.slow  # builds three setups (1, 2, 8 devices), 13 s; CI's slow set runs it
def test_held_out_samples_do_not_depend_on_the_eval_batch():
    """Each held-out sample is keyed by its record and sample number: 1, 2 and 8 devices (eval batches of 4, 3
    with a padded last batch, and 8) and slot refill give every record the same k responses."""
    batch, texts, verdicts = _graded(1, 4)
    assert batch == 4 and sorted(texts) == list(range(10)) and all(len(t) == 2 for t in texts.values())
    assert len({t for pair in texts.values() for t in pair}) > 10  # sampled, not one greedy answer per prompt
    for devices, prompts, slots, want_batch in ((2, 3, 0, 3), (8, 4, 0, 8), (1, 4, 3, 4)):
        got_batch, got_texts, got_verdicts = _graded(devices, prompts, slots)
        assert got_batch == want_batch
        assert got_texts == texts, (devices, prompts, slots)
        assert got_verdicts == verdicts
