"""End-to-end RL runs on a tiny random model: entry point, resume, checkpoints, meshes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from echorl_jax import config as config_lib
from echorl_jax.trainer import train
from echorl_jax.trainer.checkpoint import Checkpointer
from echorl_jax.trainer.metrics_log import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_test.py")


def tiny_cfg(workdir, **sections) -> config_lib.Config:
    values = config_lib.load_config_file(TINY)
    overrides = {"train": {"workdir": str(workdir)}, "sft": {"steps": 0}}
    for name, fields in sections.items():
        overrides[name] = {**overrides.get(name, {}), **fields}
    return config_lib.build_config(values, overrides)


def _rows(workdir, kind="train"):
    drop = ("time/", "tokens_per_s")
    return [
        {k: v for k, v in r.items() if not k.startswith(drop)}
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if r["kind"] == kind
    ]


def _params(result):
    return jax.tree.map(np.asarray, jax.device_get(result["setup"].state.params))


@pytest.mark.slow  # a long end-to-end run: CI runs it (python -m pytest -q -m slow)
def test_main_entry_point_two_steps(tmp_path):
    """`python -m echorl_jax.main` writes metrics, a checkpoint, an HF export and a report."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "echorl_jax.main", "--config", TINY, f"--config.train.workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert {"reward/mean", "accuracy", "echo/num_clips", "grad_norm", "lr", "time/sample"} <= set(rows[1])
    assert any(r["kind"] == "eval" and "avg@2" in r for r in rows)
    assert Checkpointer(str(workdir / "checkpoints")).latest_step() == 2
    assert os.path.isfile(workdir / "hf_export" / "config.json")
    assert os.path.isfile(workdir / "hf_export" / "model.safetensors")
    assert os.path.isfile(workdir / "report.md")


def test_bad_override_fails_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "echorl_jax.main", "--config", TINY, "--config.rl.group_sise=4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "rl.group_sise" in proc.stderr and "group_size" in proc.stderr


@pytest.mark.slow  # an end-to-end run, stopped and resumed: slow set (CI runs it)
def test_resume_is_exact(tmp_path):
    straight = train.train(tiny_cfg(tmp_path / "a", train={"steps": 4, "save_every": 2}))
    first = train.train(tiny_cfg(tmp_path / "b", train={"steps": 2, "save_every": 2}))
    assert first["step"] == 2
    resumed = train.train(tiny_cfg(tmp_path / "b", train={"steps": 4, "save_every": 2}))
    jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")


@pytest.mark.slow  # an end-to-end run: slow set (CI runs it)
def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path / "c", train={"steps": 2, "save_every": 1, "export_hf": False})
    train.train(cfg)
    ckpt_dir = tmp_path / "c" / "checkpoints"
    # A save killed mid-way leaves only Orbax's temporary directory for the new step.
    partial = ckpt_dir / "3.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_text("half-written")
    assert Checkpointer(str(ckpt_dir)).latest_step() == 2
    resumed = train.train(tiny_cfg(tmp_path / "c", train={"steps": 3, "save_every": 1, "export_hf": False}))
    assert resumed["step"] == 3
    assert [r["step"] for r in _rows(tmp_path / "c")] == [1, 2, 3]


@pytest.mark.slow  # a long end-to-end run: CI runs it (python -m pytest -q -m slow)
def test_one_device_and_eight_device_mesh_agree(tmp_path):
    one = train.train(tiny_cfg(tmp_path / "one", mesh={"shape": (1, 1, 1), "num_devices": 1},
                               train={"export_hf": False}))  # fmt: skip
    eight = train.train(tiny_cfg(tmp_path / "eight", mesh={"shape": (2, 2, 2)}, train={"export_hf": False}))
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "eight")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in set(ra) - {"kind"}:
            np.testing.assert_allclose(ra[k], rb[k], rtol=2e-4, atol=2e-5, err_msg=k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), _params(one), _params(eight))
    eight_sh = jax.tree.leaves(eight["setup"].state.params)
    assert any(len(x.sharding.device_set) == 8 for x in eight_sh)
    # The FSDP-sharded masters are not the decode layout (replicated on CPU): one copy per RL step and
    # one per evaluation (at step 0 and after the last step); none on one device in fp32.
    assert eight["setup"].sample.layout.copies == 2 and eight["setup"].eval_sample.layout.copies == 2
    assert one["setup"].sample.layout.copies == 0


def test_metrics_are_json_and_finite(tmp_path):
    train.train(tiny_cfg(tmp_path / "d", train={"steps": 1, "export_hf": False}))
    for row in read_jsonl(tmp_path / "d" / "metrics.jsonl"):
        json.dumps(row)
        assert all(v is None or np.isfinite(v) for k, v in row.items() if k not in ("step", "kind"))


@pytest.mark.slow  # end-to-end runs; test_presets_train runs every preset too: slow set (CI runs it)
@pytest.mark.parametrize("method", ["dapo", "rloo", "grpo_kl"])
def test_other_methods_run(tmp_path, method):
    objective = {"method": method}
    rl = {"minibatches": 2, "micro_batches": 2}
    if method == "dapo":
        objective["overlong_buffer"] = 4
    if method == "grpo_kl":  # reference-model KL and recomputed old log-probs
        objective = {"method": "grpo", "kl_coef": 0.05}
        rl = {"recompute_logp": True, "epochs": 2}
    out = train.train(tiny_cfg(tmp_path / method, objective=objective, train={"steps": 1, "export_hf": False}, rl=rl))
    assert out["step"] == 1
    row = _rows(tmp_path / method)[0]
    # A random model earns no reward, so these are code-path checks: finite losses, the KL term present.
    assert np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"])
    if method == "grpo_kl":
        # The reference is the initial policy and recomputed old log-probs are the policy's own: both ~0.
        assert abs(row["kl_ref"]) < 1e-6 and abs(row["approx_kl_old"]) < 1e-6


@pytest.mark.slow  # a long end-to-end run: CI runs it (python -m pytest -q -m slow)
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    """Preemption: SIGTERM mid-run saves the current step and exits 0; a rerun resumes from it."""
    import signal
    import time

    workdir = tmp_path / "pre"
    cmd = [sys.executable, "-m", "echorl_jax.main", "--config", TINY, f"--config.train.workdir={workdir}",
           "--config.train.steps=1000", "--config.sft.steps=0", "--config.train.eval_every=0"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not any(r["kind"] == "train" for r in read_jsonl(metrics)):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in out
    saved = Checkpointer(str(workdir / "checkpoints")).latest_step()
    assert saved is not None and 1 <= saved < 1000
    assert max(r["step"] for r in read_jsonl(metrics) if r["kind"] == "train") == saved


@pytest.mark.slow  # end-to-end runs: slow set (CI runs it)
def test_reused_setup_takes_the_new_config_or_refuses(tmp_path):
    """train(cfg, setup=...) runs cfg (its workdir, objective, config.json), not the setup's; settings the
    setup fixed (optimizer, reference copy) may not differ."""
    first = train.train(tiny_cfg(tmp_path / "a", train={"steps": 1, "export_hf": False}))
    other = tiny_cfg(tmp_path / "b", objective={"method": "rloo"}, train={"steps": 1, "export_hf": False, "seed": 3})
    out = train.train(other, setup=first["setup"])
    assert out["step"] == 1 and out["setup"].cfg == other
    assert len(_rows(tmp_path / "a")) == 1 and len(_rows(tmp_path / "b")) == 1
    saved = json.loads((tmp_path / "b" / "config.json").read_text())
    assert saved["objective"]["method"] == "rloo" and saved["train"]["seed"] == 3
    for bad, match in [({"optim": {"learning_rate": 0.5}}, r"optim: .*learning_rate"),
                       ({"objective": {"kl_coef": 0.1}}, r"objective.kl_coef: 0.0 vs 0.1"),
                       ({"train": {"steps": 2}}, r"train.steps: 1 vs 2")]:  # fmt: skip
        cfg = tiny_cfg(tmp_path / "c", **{"train": {"steps": 1, "export_hf": False}, **bad})
        with pytest.raises(config_lib.ConfigError, match=match):
            train.train(cfg, setup=first["setup"])
