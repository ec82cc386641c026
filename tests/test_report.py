"""report.summary_rows: held-out first/last evaluation, train signals averaged over a tenth of the run."""

from __future__ import annotations

from echorl_jax.trainer.report import summary_rows


def test_train_rows_average_first_and_last_tenth_and_eval_rows_are_single_evaluations():
    train = [{"kind": "train", "step": i + 1, "accuracy": float(i % 2), "time/step": 1.0} for i in range(40)]
    train[0]["time/step"] = 9.0  # compile
    evals = [{"kind": "eval", "step": 0, "avg@4": 0.25, "stderr/avg@4": 0.02},
             {"kind": "eval", "step": 40, "avg@4": 0.5, "stderr/avg@4": 0.03}]  # fmt: skip
    rows = {name: (first, last) for name, first, last in summary_rows(evals + train)}
    assert rows["held-out avg@4"] == ("0.25", "0.5")
    assert rows["held-out avg@4 standard error"] == ("0.02", "0.03")
    # 40 steps -> windows of 4: accuracies 0,1,0,1 at both ends; time/step (9+1+1+1)/4 vs 1.
    assert rows["train accuracy (mean of first/last 4 steps)"] == ("0.5", "0.5")
    assert rows["train time/step (mean of first/last 4 steps)"] == ("3", "1")


def test_short_runs_report_single_steps():
    train = [{"kind": "train", "step": i + 1, "accuracy": a} for i, a in enumerate([0.1, 0.2, 0.9])]
    rows = {name: (first, last) for name, first, last in summary_rows(train)}
    assert rows["train accuracy"] == ("0.1", "0.9")


def test_streaming_runs_plot_occupancy_and_lag(tmp_path):
    from echorl_jax.trainer.report import plot_all

    train = [{"kind": "train", "step": i + 1, "sampler/slot_occupancy": 0.9, "staleness/lag0_frac": 0.8,
              "staleness/lag1_frac": 0.2, "staleness/max_lag": 1} for i in range(3)]  # fmt: skip
    assert {"occupancy.png", "staleness.png"} <= set(plot_all(train, str(tmp_path)))
    assert (tmp_path / "staleness.png").stat().st_size > 0
    rows = {name: (first, last) for name, first, last in summary_rows(train)}
    assert rows["train sampler/slot_occupancy"] == ("0.9", "0.9")
