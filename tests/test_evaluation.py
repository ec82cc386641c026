"""evaluation.summarize against a slow per-prompt loop: avg@k, pass@k, counts and the standard error."""

import math

import numpy as np

from echorl_jax.trainer.grading import summarize


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
