"""Collapse guard against a measured collapse (default config, lr 1e-3, RESULTS.md) and a healthy run."""

from echorl_jax.trainer.guard import Guard, check

# Per-step (accuracy, entropy/mean, response/clip_ratio) of the lr 1e-3 default run on the 2-core CPU.
COLLAPSE = [
    (0.742, 0.06, 0.0), (0.75, 0.06, 0.0), (0.484, 0.077, 0.0), (0.625, 0.065, 0.0), (0.641, 0.069, 0.0),
    (0.398, 0.067, 0.0), (0.227, 0.136, 0.0), (0.227, 0.108, 0.0), (0.109, 0.123, 0.0), (0.039, 0.172, 0.0),
    (0.086, 0.174, 0.0), (0.07, 0.177, 0.09), (0.047, 0.173, 0.04), (0.094, 0.216, 0.02), (0.047, 0.222, 0.04),
    (0.117, 0.245, 0.11), (0.047, 0.316, 0.1), (0.0, 0.253, 0.13), (0.008, 0.344, 0.27), (0.039, 0.419, 0.37),
    (0.023, 0.506, 0.6), (0.008, 0.492, 0.8), (0.0, 0.477, 0.92), (0.0, 0.581, 0.95), (0.008, 0.5, 0.98),
]  # fmt: skip
EVALS = {0: 0.766, 10: 0.088, 20: 0.004}


def rows(series):
    return [{"accuracy": a, "entropy/mean": e, "response/clip_ratio": c} for a, e, c in series]


def first_step_of(rule, series, evals=None):
    guard = Guard("warn", log=lambda _: None)
    for step, row in enumerate(rows(series), start=1):
        guard.update(row)
        if evals and step in evals:
            guard.update({"avg@4": evals[step]}, "eval")
        if rule in guard.fired:
            return step
    return None


def test_measured_collapse_is_caught_early_by_each_rule():
    assert first_step_of("train_accuracy", COLLAPSE) == 9  # windowed accuracy 0.31 vs 0.65
    assert first_step_of("entropy", COLLAPSE) == 19  # 0.276 vs 0.066
    assert first_step_of("no_stop", COLLAPSE) == 23  # 59% of responses truncated
    guard = Guard("warn", log=lambda _: None)
    guard.update({"avg@4": EVALS[0]}, "eval")
    guard.update({"avg@4": EVALS[10]}, "eval")
    assert "heldout_accuracy" in guard.fired and "0.088 vs 0.766" in guard.fired["heldout_accuracy"]


def test_healthy_and_noisy_runs_do_not_trigger():
    healthy = [(0.70 + 0.1 * ((i * 7) % 5) / 5, 0.06 + 0.01 * (i % 3), 0.0) for i in range(40)]
    assert check(rows(healthy), [{"avg@4": 0.70}, {"avg@4": 0.76}]) == {}
    # A run that never reached min_level accuracy cannot "collapse" from it.
    weak = [(0.05 if i % 2 else 0.0, 0.5, 0.0) for i in range(20)]
    assert "train_accuracy" not in check(rows(weak), [])


def test_modes_warn_once_and_stop():
    logged = []
    warn = Guard("warn", log=logged.append)
    assert not any(warn.update(r) for r in rows(COLLAPSE))
    assert len(logged) == len(warn.fired) == 3  # each rule once
    assert all("WARNING collapse guard" in m for m in logged)
    stop = Guard("stop", log=lambda _: None)
    assert [i for i, r in enumerate(rows(COLLAPSE), 1) if stop.update(r)][0] == 9
    off = Guard("off", log=logged.append)
    assert not any(off.update(r) for r in rows(COLLAPSE)) and not off.fired
