"""The README's main job, shortened: built-in default config, warm start + GRPO+EchoRL, smaller sizes.

Same code path as `python -m echorl_jax.main` (no --config), only overrides that
shrink it to about a minute on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from xla_flags import llvm_optimised

from echorl_jax.trainer.metrics_log import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHORT = {
    "model.hidden_size": 64,
    "model.intermediate_size": 172,
    "model.num_layers": 2,
    "task.min_steps": 1,
    "task.max_steps": 2,
    "task.slip_rate": 0.0,  # exact solutions: this tiny warm start must make all-correct groups in 3 steps
    "data.max_prompt_len": 8,
    "data.num_eval_per_level": 8,
    "sampling.max_new_tokens": 28,
    "sft.steps": 400,
    "sft.learning_rate": 1e-2,
    "rl.prompts_per_step": 8,
    "train.steps": 3,
    "train.eval_every": 0,
    "train.echo_grad_norm_every": 1,
    "train.progress": False,
}


@pytest.mark.slow  # a long end-to-end run: CI runs it (python -m pytest -q -m slow)
def test_shortened_default_run_builds_and_applies_echo_clips(tmp_path):
    workdir = tmp_path / "default"
    args = [f"--config.{k}={v}" for k, v in SHORT.items()] + [f"--config.train.workdir={workdir}"]
    env = dict(os.environ, XLA_FLAGS=llvm_optimised(os.environ["XLA_FLAGS"]))  # 400 warm-start steps: executing
    proc = subprocess.run([sys.executable, "-m", "echorl_jax.main", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(workdir / "metrics.jsonl")
    evals = [r for r in rows if r["kind"] == "eval"]
    train = [r for r in rows if r["kind"] == "train"]
    # Held-out accuracy measured before RL and after it, per difficulty level.
    assert [r["step"] for r in evals] == [0, 3]
    assert all(0.0 <= r["avg@4"] <= 1.0 and "avg@4/level=2" in r for r in evals)
    # The warm start makes some groups all-correct: EchoClips are built and the echo loss is applied.
    assert sum(r["echo/num_clips"] for r in train) >= 1
    applied = [r for r in train if r["echo/num_clips"] > 0]
    assert all(r["echo_loss"] > 0 and r["echo/grad_norm"] > 0 for r in applied)
    assert any(r["echo/only_signal_frac"] > 0 for r in applied)
    # Report, plots and the exported policy exist.
    report = (workdir / "report.md").read_text()
    assert "held-out avg@4" in report and "EchoRL on" in report
    assert "held-out avg@4 standard error" in report  # the noise of the accuracy it reports
    for png in ("accuracy.png", "groups.png", "echo_clips.png"):
        assert (workdir / png).stat().st_size > 1000
    assert (workdir / "hf_export" / "model.safetensors").is_file()
    assert "held-out avg@4" in proc.stdout  # the summary table
