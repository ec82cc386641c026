"""GRPO vs GRPO+EchoRL and DAPO vs DAPO+EchoRL on the same seeds and data.

``python -m echorl_jax.main --compare [--config FILE] [--parallel N] [overrides]`` runs every
(method, echo on/off, seed) of the base config and writes ``compare.md`` / ``compare.json`` in the base
workdir: final held-out accuracy mean ± std per method, the paired EchoRL gap and its spread, and
EchoRL's wall-clock time per RL step as a ratio to the same method without it.

One warm start is shared by every run. With ``--parallel 1`` (the default on CPU) the runs go one
after another in this process; with N > 1 (the default on a GPU: 8) the warm start is trained first in
its own process, then up to N runs at once as child processes (``launch.py``), each loading it.
On a GPU every run uses deterministic XLA ops (``--xla_gpu_deterministic_ops=true``).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from typing import Mapping

import numpy as np

from echorl_jax import config as config_lib, launch
from echorl_jax.trainer import storage
from echorl_jax.trainer.metrics_log import read_jsonl
from echorl_jax.trainer.report import markdown_table

METHODS = ("grpo", "dapo")
GPU_PARALLEL = 8  # small runs at once on one GPU (the H200 measurement ran eight)


def _name(method: str, echo: bool) -> str:
    return f"{method}{'+echo' if echo else ''}"


def _variant(cfg: config_lib.Config, given: Mapping, method: str, echo: bool, seed: int) -> config_lib.Config:
    return config_lib.build_config(variant_values(cfg, given, method, echo, seed))


def variant_values(cfg: config_lib.Config, given: Mapping, method: str, echo: bool, seed: int) -> dict:
    """The base run's own settings (``given``: config file + overrides, not the resolved config, so that
    architecture fields read from ``model.path`` are not re-stated) with another method preset, EchoRL on or
    off, and its own seed and workdir. Objective fields the user set explicitly win over every preset."""
    base = cfg.train.workdir
    name = _name(method, echo)
    values = copy.deepcopy(dict(given))
    values["objective"] = {**values.get("objective", {}), "method": method}
    values["echo"] = {**values.get("echo", {}), "enabled": echo}
    # The echo grad-norm diagnostic (an extra backward) runs only if the config asks for it; its steps are
    # left out of the step times, so the time ratio stays EchoRL's own cost.
    values["train"] = {**values.get("train", {}), "seed": seed, "workdir": storage.join(base, "compare", name, f"seed{seed}"),
                       "progress": False, "export_hf": False, "resume": False}  # fmt: skip
    # One warm start (sft.seed) shared by every method and RL seed: the comparison isolates the RL phase.
    values["sft"] = {**values.get("sft", {}), "cache_dir": cfg.sft.cache_dir or storage.join(base, "warmstart")}
    return values


def final_eval(workdir: str) -> dict:
    evals = [r for r in read_jsonl(storage.join(workdir, "metrics.jsonl")) if r.get("kind") == "eval"]
    return evals[-1] if evals else {}


def mean_step_time(workdir: str) -> float:
    rows = [r for r in read_jsonl(storage.join(workdir, "metrics.jsonl")) if r.get("kind") == "train"]
    plain = [r for r in rows[1:] if "echo/grad_norm" not in r]  # skip the compiling step and diagnostic steps
    times = [r["time/step"] for r in plain] or [r["time/step"] for r in rows]
    return float(np.mean(times)) if times else float("nan")


def regime(workdir: str, key: str) -> dict:
    """Where the run spent its steps: held-out ``key`` per evaluation, the all-success fraction of groups
    in the first and last quarter of the steps, and the echo term's gradient norm as a share of the
    update's (``train.echo_grad_norm_every`` steps; NaN without them)."""
    rows = read_jsonl(storage.join(workdir, "metrics.jsonl"))
    train_rows = [r for r in rows if r.get("kind") == "train"]
    q = max(len(train_rows) // 4, 1)
    frac = [r.get("echo/frac_all_success", np.nan) for r in train_rows]
    share = [r["echo/grad_norm"] / r["grad_norm"] for r in train_rows if r.get("echo/grad_norm") and r.get("grad_norm")]
    return {
        "curve": [(r["step"], r.get(key)) for r in rows if r.get("kind") == "eval"],
        "all_success_first": float(np.nanmean(frac[:q])) if frac else float("nan"),
        "all_success_last": float(np.nanmean(frac[-q:])) if frac else float("nan"),
        "echo_grad_share": float(np.mean(share)) if share else float("nan"),
    }


def run(cfg: config_lib.Config, given: Mapping, seeds: tuple[int, ...] = (0, 1, 2), *, parallel: int = 0,
        platform: str | None = None, methods: tuple[str, ...] = METHODS) -> dict:  # fmt: skip
    """``given``: the base run's config-file values merged with its overrides (``config.merge_given``).
    ``parallel``: runs at once, as child processes (0: 8 on a GPU, else 1 = one after another here);
    ``platform``: JAX's backend (default: asked of a child process, see ``launch.jax_platform``)."""
    platform = platform or launch.jax_platform()
    parallel = parallel or (GPU_PARALLEL if platform == "gpu" else 1)
    runs = [(method, echo, seed) for seed in seeds for method in methods for echo in (False, True)]
    if parallel > 1 and storage.is_remote(cfg.train.workdir):
        raise config_lib.ConfigError(f"--parallel {parallel} with train.workdir={cfg.train.workdir!r}: child runs need a "
                                     "local workdir (their config files and logs); use a local one or --parallel 1")
    if parallel > 1:
        _run_children(cfg, given, runs, parallel, platform)
    else:
        _run_here(cfg, given, runs, platform)
    results: dict[str, dict[int, dict]] = {}
    for method, echo, seed in runs:
        workdir = variant_values(cfg, given, method, echo, seed)["train"]["workdir"]
        results.setdefault(_name(method, echo), {})[seed] = {
            "eval": final_eval(workdir),
            "step_time": mean_step_time(workdir),
            "regime": regime(workdir, f"avg@{cfg.train.eval_samples}"),
        }
    return write(cfg, results, seeds, methods, note=_how_run(platform, min(parallel, len(runs))))


def _how_run(platform: str, parallel: int) -> str:
    """compare.md's line on determinism and concurrency."""
    flags = (launch.child_env(platform) if parallel > 1 else os.environ).get("XLA_FLAGS", "")
    exact = {"cpu": "deterministic", "gpu": f"{'' if launch.is_deterministic(flags) else 'non-'}deterministic XLA ops"}
    how = (f"{parallel} runs at once as processes (step times include sharing the device)" if parallel > 1
           else "one run after another in one process")  # fmt: skip
    return f"Platform {platform} ({exact.get(platform, 'determinism not measured')}); {how}."


def _run_here(cfg: config_lib.Config, given: Mapping, runs, platform: str) -> None:
    """One after another in this process; the first run trains the warm start, the others load it."""
    from echorl_jax.trainer import train

    if platform == "gpu" and not launch.is_deterministic(os.environ.get("XLA_FLAGS", "")):
        print("[compare] warning: XLA_FLAGS lacks --xla_gpu_deterministic_ops=true, so GPU runs are not "
              "reproducible (python -m echorl_jax.main --compare sets it before JAX starts)", flush=True)  # fmt: skip
    for method, echo, seed in runs:
        v = _variant(cfg, given, method, echo, seed)
        print(f"[compare] {_name(method, echo)} seed {seed} -> {v.train.workdir}", flush=True)
        train.train(v)


def _run_children(cfg: config_lib.Config, given: Mapping, runs, parallel: int, platform: str) -> None:
    """The warm start first, in one process (``trainer/sft.py``'s cache is not safe for two writers of the same
    entry), then up to ``parallel`` runs at once, each loading it from ``sft.cache_dir``."""
    env = launch.child_env(platform)
    root = os.path.join(cfg.train.workdir, "compare")
    jobs = []
    for method, echo, seed in runs:
        values = variant_values(cfg, given, method, echo, seed)
        workdir = values["train"]["workdir"]
        config_file = launch.write_config_file(os.path.join(workdir, "run_config.py"), values)
        argv = launch.python_module("echorl_jax.main", "--config", config_file)
        jobs.append(launch.Job(f"{_name(method, echo)} seed {seed}", argv, os.path.join(workdir, "run.log"), env))
    if cfg.sft.steps > 0:
        method, echo, seed = runs[0]
        config_file = launch.write_config_file(os.path.join(root, "warmstart_config.py"),
                                               variant_values(cfg, given, method, echo, seed))  # fmt: skip
        argv = launch.python_module("echorl_jax.compare", "--warm-start", config_file)
        launch.run_all([launch.Job("warm start", argv, os.path.join(root, "warmstart.log"), env)], 1)
    launch.run_all(jobs, parallel)


def write(cfg: config_lib.Config, results: dict, seeds, methods: tuple[str, ...] = METHODS, note: str = "") -> dict:
    k = cfg.train.eval_samples
    key = f"avg@{k}"
    rows, summary = [], {}
    for method in methods:
        base = np.array([results[method][s]["eval"].get(key, np.nan) for s in seeds])
        echo = np.array([results[method + "+echo"][s]["eval"].get(key, np.nan) for s in seeds])
        t_base = np.array([results[method][s]["step_time"] for s in seeds])
        t_echo = np.array([results[method + "+echo"][s]["step_time"] for s in seeds])
        gap = echo - base
        ratio = t_echo.mean() / t_base.mean()
        summary[method] = dict(base=base.tolist(), echo=echo.tolist(), gap_mean=gap.mean(), gap_std=_sd(gap),
                               step_time_base=t_base.mean(), step_time_echo=t_echo.mean(), overhead_ratio=ratio)  # fmt: skip
        rows.append((method, f"{base.mean():.3f} ± {_sd(base):.3f}", f"{echo.mean():.3f} ± {_sd(echo):.3f}",
                     f"{gap.mean():+.3f} ± {_sd(gap):.3f}", f"{t_base.mean():.2f}", f"{t_echo.mean():.2f}",
                     f"{ratio:.3f}"))  # fmt: skip
    header = ["method", f"held-out {key} (base)", f"{key} (+EchoRL)", "gap (paired, ± std)", "s/step base",
              "s/step +EchoRL", "time ratio"]  # fmt: skip
    table = markdown_table(header, rows)
    regime_table = markdown_table(
        ["run", "all-success groups (first → last quarter)", "echo grad share", f"held-out {key} by step"],
        [_regime_row(name, [results[name][s].get("regime") for s in seeds])
         for method in methods for name in (method, method + "+echo")],
    )  # fmt: skip
    text = "\n".join([
        f"# {'/'.join(m.upper() for m in methods)} vs +EchoRL",
        "",
        f"Seeds {list(seeds)}; {cfg.train.steps} RL steps; {cfg.rl.prompts_per_step} prompts × {cfg.rl.group_size} "
        f"rollouts; one warm start ({cfg.sft.steps} SFT steps, sft.seed={cfg.sft.seed}) shared by every run; held-out "
        f"{key} at temperature {cfg.train.eval_temperature}. ± is the sample std over seeds. {note}".rstrip(),
        "",
        table,
        "",
        "Regime (means over seeds; echo grad share = ||grad of λ·L_echo|| / ||grad of the whole loss||, on the "
        "steps that logged it):",
        "",
        regime_table,
        "",
    ])  # fmt: skip
    base_dir = cfg.train.workdir
    import jax

    if jax.process_index() == 0:  # every process computes the table (the runs' files are process 0's)
        storage.write_text(storage.join(base_dir, "compare.md"), text)
        storage.write_text(storage.join(base_dir, "compare.json"),
                           json.dumps({"summary": summary, "runs": results}, indent=1, default=float))
        print(text)
    return summary



def _sd(x: np.ndarray) -> float:
    """Sample std over seeds (0 for a single seed, which has no spread to report)."""
    return float(x.std(ddof=1)) if len(x) > 1 else 0.0


def _regime_row(name: str, regimes: list) -> tuple:
    regimes = [r for r in regimes if r]
    if not regimes:
        return (name, "-", "-", "-")
    def mean(k: str) -> float:  # NaN when no seed logged it (e.g. no echo grad-norm steps), without a warning
        v = np.array([r[k] for r in regimes], float)
        return float(v[~np.isnan(v)].mean()) if (~np.isnan(v)).any() else float("nan")

    curve = {}
    for r in regimes:
        for step, v in r["curve"]:
            curve.setdefault(step, []).append(v if v is not None else np.nan)
    by_step = ", ".join(f"{step}: {np.nanmean(v):.3f}" for step, v in sorted(curve.items()))
    share = mean("echo_grad_share")
    return (name, f"{mean('all_success_first'):.2f} → {mean('all_success_last'):.2f}",
            "-" if np.isnan(share) else f"{share:.2e}", by_step)  # fmt: skip


def warm_start_only(cfg: config_lib.Config) -> None:
    """Trains and caches ``cfg``'s warm start (building the run's setup does it) and nothing else."""
    from echorl_jax.trainer import setup

    setup.build_setup(cfg)


if __name__ == "__main__":  # the comparison's warm-start process: python -m echorl_jax.compare --warm-start FILE
    if sys.argv[1:2] != ["--warm-start"] or len(sys.argv) != 3:
        sys.exit("usage: python -m echorl_jax.compare --warm-start CONFIG_FILE")
    warm_start_only(config_lib.build_config(config_lib.load_config_file(sys.argv[2])))
