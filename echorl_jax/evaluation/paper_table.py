"""The paper's results table: six in-distribution math sets, three out-of-distribution sets, their averages.

``benchmark_scores(metrics, k)`` picks each data_source's avg@k / pass@k / count out
of an ``trainer.grading.summarize`` dict; ``markdown_table(rows, k)`` lays runs out as
the paper does (columns AIME24 ... ID avg, ARC-c ... OOD avg), in percent. An
average is over the benchmarks present; a column with no data shows "-", and the
average's header then says how many of its sets it covers. data_sources outside
the paper's nine are listed after the table. ``run_label(cfg)`` names a trained
run's row by its method and whose setting it follows ("GRPO (EchoRL authors'
script) + EchoRL", "GRPO (DeepSeekMath)": ``methods.describe_objective``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

# (column header, data_source written by echorl_jax.data_prep)
IN_DISTRIBUTION = (("AIME24", "aime24"), ("AIME25", "aime25"), ("AMC", "amc23"), ("MATH-500", "math500"),
                   ("Minerva", "minerva"), ("Olympiad", "olympiadbench"))  # fmt: skip
OUT_OF_DISTRIBUTION = (("ARC-c", "arc_c"), ("GPQA", "gpqa_diamond"), ("MMLU-Pro", "mmlu_pro"))
PAPER_SOURCES = tuple(src for _, src in IN_DISTRIBUTION + OUT_OF_DISTRIBUTION)


def run_label(cfg) -> str:
    """The method of a training config and whose setting it follows, ``+ EchoRL`` when it is on."""
    from echorl_jax.rl import methods

    label = methods.describe_objective(cfg.objective, cfg.sampling.max_new_tokens)
    return label + (" + EchoRL" if cfg.echo.enabled else "")


def benchmark_scores(metrics: Mapping[str, float], k: int) -> dict[str, dict[str, float]]:
    """data_source -> {"avg@k", "pass@k", "count"} from ``trainer.grading.summarize``'s ``/source=NAME`` keys."""
    out: dict[str, dict[str, float]] = {}
    prefix = f"avg@{k}/source="
    for key in metrics:
        if key.startswith(prefix):
            src = key[len(prefix) :]
            out[src] = {f"avg@{k}": metrics[key], f"pass@{k}": metrics[f"pass@{k}/source={src}"],
                        "count": metrics[f"count/source={src}"]}  # fmt: skip
    return out


def group_average(scores: Mapping[str, Mapping[str, float]], columns, metric: str) -> tuple[float, int]:
    """Mean of ``metric`` over the columns' benchmarks that were evaluated, and how many there were."""
    values = [scores[src][metric] for _, src in columns if src in scores]
    return (sum(values) / len(values), len(values)) if values else (math.nan, 0)


def summary_row(scores: Mapping[str, Mapping[str, float]], metric: str) -> dict[str, float]:
    """Column header -> value (fraction) for one metric, averages included."""
    row: dict[str, float] = {}
    for columns, avg_name in ((IN_DISTRIBUTION, "ID avg"), (OUT_OF_DISTRIBUTION, "OOD avg")):
        for header, src in columns:
            row[header] = scores[src][metric] if src in scores else math.nan
        row[avg_name], _ = group_average(scores, columns, metric)
    return row


def _cell(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}"


def markdown_table(rows: Sequence[tuple[str, Mapping[str, Mapping[str, float]]]], k: int) -> str:
    """One line per (label, scores) for avg@k, then the same runs' pass@k; percent, one decimal."""
    headers = [h for h, _ in IN_DISTRIBUTION] + ["ID avg"] + [h for h, _ in OUT_OF_DISTRIBUTION] + ["OOD avg"]
    covered = {}
    for columns, name in ((IN_DISTRIBUTION, "ID avg"), (OUT_OF_DISTRIBUTION, "OOD avg")):
        counts = {group_average(scores, columns, f"avg@{k}")[1] for _, scores in rows}
        if counts != {len(columns)}:
            covered[name] = f"{name} ({'/'.join(map(str, sorted(counts)))} of {len(columns)})"
    shown = [covered.get(h, h) for h in headers]
    lines = ["| run | metric | " + " | ".join(shown) + " |", "|---|---|" + "---:|" * len(headers)]
    for metric in (f"avg@{k}", f"pass@{k}"):
        for label, scores in rows:
            row = summary_row(scores, metric)
            lines.append(f"| {label} | {metric} | " + " | ".join(_cell(row[h]) for h in headers) + " |")
    extra = sorted({src for _, scores in rows for src in scores} - set(PAPER_SOURCES))
    for src in extra:
        for label, scores in rows:
            if src in scores:
                s = scores[src]
                lines.append(f"\nother: {label} {src}: avg@{k} {_cell(s[f'avg@{k}'])}, pass@{k} "
                             f"{_cell(s[f'pass@{k}'])} ({int(s['count'])} prompts)")  # fmt: skip
    return "\n".join(lines) + "\n"
