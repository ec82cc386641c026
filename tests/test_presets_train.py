"""Every method preset (and +echo) runs one RL step of the trainer on the tiny config."""

from __future__ import annotations

import os

import numpy as np
import pytest

from echorl_jax import config as config_lib
from echorl_jax.rl import methods
from echorl_jax.trainer import train
from echorl_jax.trainer.metrics_log import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_test.py")


def one_step_cfg(workdir, method: str) -> config_lib.Config:
    overrides = {
        "objective": {"method": method},
        "data": {"eval": ""},  # no held-out evaluation
        "sft": {"steps": 0},  # no warm start
        "train": {"workdir": str(workdir), "steps": 1, "export_hf": False, "resume": False},
    }
    return config_lib.build_config(config_lib.load_config_file(TINY), overrides)


@pytest.mark.slow  # a long end-to-end run: CI runs it (python -m pytest -q -m slow)
def test_every_preset_runs_one_rl_step(tmp_path):
    """No overrides beyond the method name: length-dependent preset values (dapo's
    overlong buffer) resolve against the tiny config's max_new_tokens."""
    names = methods.list_methods()
    setup = None
    for i, name in enumerate(names):
        method = name + ("+echo" if i % 2 else "")  # the +echo form on every other preset
        cfg = one_step_cfg(tmp_path / name, method)
        assert cfg.objective.method == name and cfg.echo.enabled  # the tiny config has EchoRL on anyway
        if name == "dapo":
            assert cfg.objective.overlong_buffer == round(0.2 * cfg.sampling.max_new_tokens)
        # One model, data pipeline and sampler for all presets (the sampler compiles once); train() runs
        # cfg's objective on it. luffy draws G - k rollouts and appends k expert rows (the arith task's
        # worked solutions): its own setup.
        same_layout = setup is not None and setup.cfg.objective.expert_per_group == cfg.objective.expert_per_group
        setup = setup if same_layout else None
        out = train.train(cfg, setup=setup)
        setup = out["setup"]
        assert out["step"] == 1
        rows = [r for r in read_jsonl(tmp_path / name / "metrics.jsonl") if r["kind"] == "train"]
        assert [r["step"] for r in rows] == [1], name
        assert np.isfinite(rows[0]["loss"]) and np.isfinite(rows[0]["grad_norm"]), (name, rows[0])
        if name == "luffy":  # the expert rows are the task's worked solutions, verified correct
            assert rows[0]["expert/accuracy"] == 1.0 and 0 < rows[0]["offpolicy_prob"] < 1
