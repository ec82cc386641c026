"""GRPO vs GRPO+EchoRL and DAPO vs DAPO+EchoRL on the same seeds and data.

``python -m echorl_jax.main --compare [--config FILE] [overrides]`` runs every
(method, echo on/off, seed) of the base config in one process and writes
``compare.md`` / ``compare.json`` in the base workdir: final held-out accuracy
mean ± std per method, the paired EchoRL gap and its spread, and EchoRL's
wall-clock time per RL step as a ratio to the same method without it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from echorl_jax import config as config_lib
from echorl_jax.metrics_log import read_jsonl
from echorl_jax.report import markdown_table

METHODS = ("grpo", "dapo")


def _variant(cfg: config_lib.Config, method: str, echo: bool, seed: int) -> config_lib.Config:
    base = cfg.train.workdir
    name = f"{method}{'+echo' if echo else ''}"
    values = config_lib.to_dict(cfg)
    values["objective"] = {"method": method}  # the preset, then the overrides the comparison needs
    values["echo"] = dict(values["echo"], enabled=echo)
    # The echo grad-norm diagnostic costs an extra backward: off, so the time ratio is EchoRL's own cost.
    values["train"] = dict(values["train"], seed=seed, workdir=os.path.join(base, "compare", name, f"seed{seed}"),
                           progress=False, export_hf=False, resume=False, echo_grad_norm_every=0)  # fmt: skip
    # One warm start (sft.seed) shared by every method and RL seed: the comparison isolates the RL phase.
    values["sft"] = dict(values["sft"], cache_dir=cfg.sft.cache_dir or os.path.join(base, "warmstart"))
    return config_lib.build_config(values)


def final_eval(workdir: str) -> dict:
    evals = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("kind") == "eval"]
    return evals[-1] if evals else {}


def mean_step_time(workdir: str) -> float:
    rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r.get("kind") == "train"]
    times = [r["time/step"] for r in rows[1:]] or [r["time/step"] for r in rows]  # skip the compiling step
    return float(np.mean(times)) if times else float("nan")


def run(cfg: config_lib.Config, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    from echorl_jax import train

    results: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for method in METHODS:
            for echo in (False, True):
                v = _variant(cfg, method, echo, seed)
                name = f"{method}{'+echo' if echo else ''}"
                print(f"[compare] {name} seed {seed} -> {v.train.workdir}", flush=True)
                train.train(v)
                results.setdefault(name, {})[seed] = {
                    "eval": final_eval(v.train.workdir),
                    "step_time": mean_step_time(v.train.workdir),
                }
    return write(cfg, results, seeds)


def write(cfg: config_lib.Config, results: dict, seeds) -> dict:
    k = cfg.train.eval_samples
    key = f"avg@{k}"
    rows, summary = [], {}
    for method in METHODS:
        base = np.array([results[method][s]["eval"].get(key, np.nan) for s in seeds])
        echo = np.array([results[method + "+echo"][s]["eval"].get(key, np.nan) for s in seeds])
        t_base = np.array([results[method][s]["step_time"] for s in seeds])
        t_echo = np.array([results[method + "+echo"][s]["step_time"] for s in seeds])
        gap = echo - base
        ratio = t_echo.mean() / t_base.mean()
        summary[method] = dict(base=base.tolist(), echo=echo.tolist(), gap_mean=gap.mean(), gap_std=gap.std(ddof=1),
                               step_time_base=t_base.mean(), step_time_echo=t_echo.mean(), overhead_ratio=ratio)  # fmt: skip
        rows.append((method, f"{base.mean():.3f} ± {base.std(ddof=1):.3f}", f"{echo.mean():.3f} ± {echo.std(ddof=1):.3f}",
                     f"{gap.mean():+.3f} ± {gap.std(ddof=1):.3f}", f"{t_base.mean():.2f}", f"{t_echo.mean():.2f}",
                     f"{ratio:.3f}"))  # fmt: skip
    header = ["method", f"held-out {key} (base)", f"{key} (+EchoRL)", "gap (paired, ± std)", "s/step base",
              "s/step +EchoRL", "time ratio"]  # fmt: skip
    table = markdown_table(header, rows)
    text = "\n".join([
        "# GRPO/DAPO vs +EchoRL",
        "",
        f"Seeds {list(seeds)}; {cfg.train.steps} RL steps; {cfg.rl.prompts_per_step} prompts × {cfg.rl.group_size} "
        f"rollouts; one warm start ({cfg.sft.steps} SFT steps, sft.seed={cfg.sft.seed}) shared by every run; held-out "
        f"{key} at temperature {cfg.train.eval_temperature}. ± is the sample std over seeds.",
        "",
        table,
        "",
    ])  # fmt: skip
    base_dir = cfg.train.workdir
    os.makedirs(base_dir, exist_ok=True)
    with open(os.path.join(base_dir, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(base_dir, "compare.json"), "w") as f:
        json.dump({"summary": summary, "runs": results}, f, indent=1, default=float)
    print(text)
    return summary

