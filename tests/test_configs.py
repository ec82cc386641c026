"""Every shipped top-level config builds, and the GPU-sized evidence config runs end to end when shrunk."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
from xla_flags import llvm_optimised

from echorl_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_file_builds(path):
    values = config_lib.load_config_file(path)
    if values.get("model", {}).get("path"):
        pytest.skip("needs a model directory (tests/test_byo.py runs it on a tiny checkpoint)")
    cfg = config_lib.build_config(values, {})
    assert cfg.train.steps >= 1 and cfg.rl.group_size >= 2


@pytest.mark.slow  # ~30 s compiling a 23M-parameter model; CI runs the slow tests separately
def test_evidence_large_runs_shrunk(tmp_path):
    """Its own model shape and sections, only the lengths cut (the real run needs a GPU)."""
    shrink = {"sft.steps": 2, "sft.batch_size": 8, "rl.prompts_per_step": 2, "train.steps": 1,
              "train.eval_every": 0, "data.num_train": 64, "data.num_eval_per_level": 2,
              "train.progress": False, "train.export_hf": False, "train.workdir": tmp_path / "run"}  # fmt: skip
    args = [f"--config.{k}={v}" for k, v in shrink.items()]
    env = dict(os.environ, XLA_FLAGS=llvm_optimised(os.environ["XLA_FLAGS"]))  # 23M parameters: executing dominates
    proc = subprocess.run([sys.executable, "-m", "echorl_jax.main", "--config", "configs/evidence_large.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out avg@4" in proc.stdout
