"""End-of-run summary table and ``report.md`` with PNG plots, built from ``metrics.jsonl``."""

from __future__ import annotations

import os
import re
from typing import Any

from echorl_jax.trainer import storage
from echorl_jax.trainer.metrics_log import read_jsonl

PLOTS = {
    "accuracy.png": ("Held-out accuracy", "eval", r"^avg@\d+(/level=\d+)?$"),
    "groups.png": ("Rollout groups", "train", r"^echo/frac_(all_success|mixed|all_fail)$"),
    "echo_clips.png": ("EchoClips per step and mean length", "train", r"^echo/(num_clips|mean_clip_len)$"),
    "entropy.png": ("Mean response-token entropy", "train", r"^entropy/mean$"),
    "echo_only.png": ("Prompts whose only signal is the echo term", "train", r"^echo/only_signal_frac$"),
    "mismatch.png": ("Sampler vs learner: mean |Δ log p| per token and per sequence", "train",
                     r"^mismatch/(tok|seq)_abs_mean$"),
    "occupancy.png": ("Decode slot occupancy", "train", r"^sampler/slot_occupancy$"),
    "staleness.png": ("Loss tokens by policy versions behind the learner", "train", r"^staleness/lag\d+_frac$"),
}
# Sampler-vs-learner mismatch (trainer/learner_pass.py), summarised when the run measured it.
MISMATCH_KEYS = ("mismatch/tok_abs_mean", "mismatch/tok_abs_max", "mismatch/tok_k3", "mismatch/tok_out_frac",
                 "mismatch/seq_abs_mean", "mismatch/seq_abs_max", "mismatch/seq_k3", "mismatch/seq_out_frac")


def _series(rows: list[dict], kind: str, pattern: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    rx = re.compile(pattern)
    for r in rows:
        if r.get("kind") != kind:
            continue
        for k, v in r.items():
            if rx.search(k) and v is not None:
                xs, ys = out.setdefault(k, ([], []))
                xs.append(r["step"])
                ys.append(v)
    return out


def plot_all(rows: list[dict], workdir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, (title, kind, pattern) in PLOTS.items():
        series = _series(rows, kind, pattern)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, (xs, ys) in sorted(series.items()):
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, name), dpi=100)  # workdir: local (write_report uploads a bucket's)
        plt.close(fig)
        written.append(name)
    return written


def summary_rows(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(metric, first, last) for held-out accuracy and the main training signals."""
    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if r.get("kind") == "train"]
    out = []
    if evals:
        first, last = evals[0], evals[-1]
        for k in sorted(k for k in last if k.startswith(("avg@", "pass@"))):
            out.append((f"held-out {k}", _fmt(first.get(k)), _fmt(last.get(k))))
        for k in sorted(k for k in last if k.startswith("stderr/avg@") and "/" not in k[len("stderr/"):]):
            out.append((f"held-out {k[len('stderr/'):]} standard error", _fmt(first.get(k)), _fmt(last.get(k))))
    if train:
        # One step's train metrics are noisy (16 prompts): average the first and last tenth of the run.
        n = max(1, len(train) // 10)
        where = f" (mean of first/last {n} steps)" if n > 1 else ""
        for k in ("reward/mean", "accuracy", "echo/frac_all_success", "echo/frac_mixed", "echo/frac_all_fail",
                  "echo/num_clips", "echo/mean_clip_len", "echo/only_signal_frac", "entropy/mean", "time/step",
                  "sampler/slot_occupancy", "staleness/lag1_frac", "stream/dropped_groups"):  # fmt: skip
            if k in train[-1]:
                out.append((f"train {k}{where}", _fmt(_mean(train[:n], k)), _fmt(_mean(train[-n:], k))))
        measured = [r for r in train if "mismatch/tok_abs_mean" in r]  # every step, or every train.mismatch_every
        m = max(1, len(measured) // 10)
        for k in MISMATCH_KEYS if measured else ():
            where = f" (mean of first/last {m} measured steps)" if m > 1 else ""
            out.append((f"train {k}{where}", _fmt(_mean(measured[:m], k)), _fmt(_mean(measured[-m:], k))))
    return out


def _mean(rows: list[dict], key: str) -> float | None:
    values = [float(r[key]) for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown_table(header: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(cfg, result: dict[str, Any]) -> str | None:
    import jax

    if jax.process_index() != 0:
        return None
    workdir = cfg.train.workdir
    rows = read_jsonl(storage.join(workdir, "metrics.jsonl"))
    with storage.local_dir_for(workdir) as local:  # a bucket's plots and report are uploaded at the end
        os.makedirs(local, exist_ok=True)
        plots = plot_all(rows, local)
        text = _report_text(cfg, workdir, rows, plots)
        with open(os.path.join(local, "report.md"), "w") as f:
            f.write("\n".join(text))
    path = storage.join(workdir, "report.md")
    print("\n" + markdown_table(["metric", "first", "last"], summary_rows(rows)))
    print(f"\nreport: {path}")
    return path


def _report_text(cfg, workdir: str, rows: list[dict], plots: list[str]) -> list[str]:
    table = summary_rows(rows)
    echo = f"EchoRL on (λ={cfg.echo.coef}, eligible={cfg.echo.eligible})" if cfg.echo.enabled else "EchoRL off"
    text = [
        "# echorl-jax run report",
        "",
        f"- method: `{cfg.objective.method}` ({cfg.objective.estimator} advantages, {cfg.objective.policy_loss} loss), {echo}",
        f"- data: `{cfg.data.train}`, {cfg.rl.prompts_per_step} prompts × {cfg.rl.group_size} rollouts per step, "
        f"{cfg.train.steps} RL steps, warm start {cfg.sft.steps} SFT steps",
        f"- model: {cfg.model.path or cfg.model.model_type + ' (random init)'}; workdir `{workdir}`",
        "",
        "## Summary (first → last)",
        "",
        markdown_table(["metric", "first", "last"], table),
        "",
    ]
    for name in plots:
        text += [f"![{name}]({name})", ""]
    return text
