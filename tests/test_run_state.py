"""Run-state integrity: a workdir holds one run; resume continues only that run; nothing mixes silently."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from echorl_jax import compare, config as config_lib, main
from echorl_jax.models.config import ModelConfig
from echorl_jax.models.transformer import Transformer
from echorl_jax.rl import update
from echorl_jax.trainer import learn_step, run_state, train
from echorl_jax.trainer.checkpoint import Checkpointer
from echorl_jax.trainer.metrics_log import read_jsonl
from tests.test_train import ROOT, TINY, tiny_cfg


def _steps(workdir, kind):
    return [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["kind"] == kind]


@pytest.mark.slow  # end-to-end runs: slow set (CI runs it)
def test_fresh_run_moves_the_old_run_aside_and_its_checkpoints_are_written(tmp_path):
    w = tmp_path / "w"
    train.train(tiny_cfg(w, train={"steps": 2, "export_hf": False}))
    assert Checkpointer(str(w / "checkpoints")).latest_step() == 2
    train.train(tiny_cfg(w, train={"steps": 1, "export_hf": False, "resume": False}))
    # The new run's own checkpoint is the latest (Orbax would skip step 1 <= 2 if the old run were still there).
    assert Checkpointer(str(w / "checkpoints")).latest_step() == 1
    assert _steps(w, "eval") == [0, 1] and _steps(w, "train") == [1]  # one run's rows only
    (old,) = (w / run_state.PREVIOUS).iterdir()
    assert _steps(old, "train") == [1, 2] and Checkpointer(str(old / "checkpoints")).latest_step() == 2
    # The next default (resuming) run continues the *new* run.
    out = train.train(tiny_cfg(w, train={"steps": 1, "export_hf": False}))
    assert out["step"] == 1 and _steps(w, "train") == [1]


@pytest.mark.slow  # end-to-end runs: slow set (CI runs it)
def test_resume_with_changed_settings_is_refused_with_a_diff(tmp_path):
    w = tmp_path / "w"
    train.train(tiny_cfg(w, train={"steps": 1, "export_hf": False}))
    with pytest.raises(run_state.ResumeMismatch) as e:
        train.train(tiny_cfg(w, train={"steps": 2, "export_hf": False}, optim={"learning_rate": 5e-4},
                             echo={"enabled": False}))  # fmt: skip
    msg = str(e.value)
    assert "optim.learning_rate: 0.001 (saved) -> 0.0005 (now)" in msg and "echo.enabled" in msg
    assert "train.workdir" in msg and "train.resume=false" in msg and "train.steps" not in msg
    # A changed model or batch size gets the same message, not a raw Orbax / iterator error.
    with pytest.raises(run_state.ResumeMismatch, match="model.hidden_size"):
        train.train(tiny_cfg(w, model={"hidden_size": 64}))
    with pytest.raises(run_state.ResumeMismatch, match="rl.prompts_per_step"):
        train.train(tiny_cfg(w, rl={"prompts_per_step": 8}))
    # Steps, evaluation and logging may change: the run continues.
    out = train.train(tiny_cfg(w, train={"steps": 2, "export_hf": False, "eval_every": 1, "log_every": 1}))
    assert out["step"] == 2 and _steps(w, "train") == [1, 2]


def test_config_diff_ignores_resumable_keys_and_fields_unknown_to_one_side():
    saved = {"train": {"steps": 4, "seed": 0}, "optim": {"learning_rate": 1e-4}, "mesh": {"shape": [1, 1, 1]},
             "old_section": {"x": 1}}  # fmt: skip
    now = {"train": {"steps": 8, "seed": 1}, "optim": {"learning_rate": 1e-4}, "mesh": {"shape": (2, 2, 2)},
           "new_section": {"y": 2}}  # fmt: skip
    assert run_state.config_diff(saved, now) == [("train.seed", 0, 1)]


@pytest.mark.slow  # a long end-to-end run: CI runs it (python -m pytest -q -m slow)
def test_cli_refuses_a_changed_method_in_the_same_workdir(tmp_path):
    """The README's override example, run after a default run in the same workdir."""
    w = tmp_path / "cli"
    base = [sys.executable, "-m", "echorl_jax.main", "--config", TINY, f"--config.train.workdir={w}",
            "--config.sft.steps=0", "--config.train.steps=1", "--config.train.export_hf=false"]  # fmt: skip
    assert subprocess.run(base, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    proc = subprocess.run([*base, "--config.objective.method=rloo"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "objective.method: 'grpo' (saved) -> 'rloo' (now)" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # end-to-end runs: slow set (CI runs it)
def test_sigterm_in_the_last_step_still_gets_its_final_evaluation_after_resume(tmp_path, monkeypatch):
    w = tmp_path / "w"
    run_updates = learn_step.run_updates

    def preempted_at_step_2(*args, step, **kwargs):
        out = run_updates(*args, step=step, **kwargs)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler only sets a flag
        return out

    monkeypatch.setattr(learn_step, "run_updates", preempted_at_step_2)
    cfg = tiny_cfg(w, train={"steps": 2, "export_hf": False})
    train.train(cfg)
    assert _steps(w, "eval") == [0] and Checkpointer(str(w / "checkpoints")).latest_step() == 2
    monkeypatch.setattr(learn_step, "run_updates", run_updates)
    out = train.train(cfg)
    assert _steps(w, "eval") == [0, 2] and _steps(w, "train") == [1, 2]
    assert "avg@2" in out["eval"]
    # Resuming a finished run trains nothing, evaluates nothing more and reports the final evaluation.
    again = train.train(cfg)
    assert _steps(w, "eval") == [0, 2] and again["eval"] == out["eval"]


def test_log_every_thins_the_train_rows(tmp_path):
    w = tmp_path / "w"
    train.train(tiny_cfg(w, train={"steps": 3, "log_every": 2, "export_hf": False}))
    assert _steps(w, "train") == [2, 3]  # every 2nd step, and the last


def test_default_workdir_comes_from_the_config_file_name(tmp_path):
    cfg_file = tmp_path / "my_run.py"
    cfg_file.write_text("def get_config():\n    return {'train': {'steps': 3}}\n")
    _, cfg = main.parse_args(["--config", str(cfg_file)])
    assert cfg.train.workdir == os.path.join("runs", "my_run")
    _, cfg = main.parse_args(["--config", str(cfg_file), "--config.train.workdir=elsewhere"])
    assert cfg.train.workdir == "elsewhere"


def test_compare_keeps_user_objective_overrides_and_works_with_model_path(tmp_path):
    given = config_lib.merge_given(config_lib.load_config_file(TINY), {
        "objective": {"kl_coef": 0.05, "entropy_coef": 0.01, "clip_high": 0.3},
        "train": {"workdir": str(tmp_path)},
    })  # fmt: skip
    cfg = config_lib.build_config(given)
    v = compare._variant(cfg, given, "dapo", True, 1)
    o = v.objective
    assert (o.method, o.dynamic_sampling, o.aggregation) == ("dapo", True, "token-mean")  # the preset
    assert (o.kl_coef, o.entropy_coef, o.clip_high) == (0.05, 0.01, 0.3)  # the user's overrides
    assert v.echo.enabled and v.train.seed == 1 and not v.train.resume
    # With model.path the architecture comes from config.json; the variant must not restate it.
    with_path = config_lib.merge_given({k: v for k, v in given.items() if k != "model"},
                                       {"model": {"path": str(tmp_path / "hf"), "param_dtype": "float32"}})  # fmt: skip
    cfg = config_lib.build_config(with_path)
    assert compare._variant(cfg, with_path, "grpo", False, 0).model.path == str(tmp_path / "hf")


# ---------------------------------------------------------------- passes outside train_step are micro-batched


def _model_and_batch(vocab=2048, b=16, p=8, t=24):
    cfg = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=64)  # fmt: skip
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (b, p + t)).astype(np.int32)
    plen = rng.integers(1, p + 1, b)
    rlen = rng.integers(1, t + 1, b)
    col = np.arange(p + t)
    valid = (col[None] >= p - plen[:, None]) & (col[None] < p + rlen[:, None])
    return graphdef, params, jnp.asarray(tokens), jnp.asarray(valid), t


def test_forward_logp_is_micro_batched_values_and_memory():
    graphdef, params, tokens, valid, t = _model_and_batch()
    whole = update.make_forward_logp(graphdef, t, 1.0, 1)
    chunked = update.make_forward_logp(graphdef, t, 1.0, 4)
    ref = update.response_logp(graphdef, params, tokens, valid, t, 1.0)[0]
    mask = np.asarray(valid[:, -t:])
    for fn in (whole, chunked):
        np.testing.assert_allclose(np.asarray(fn(params, tokens, valid))[mask], np.asarray(ref)[mask], rtol=1e-5,
                                   atol=1e-5)  # fmt: skip
    temp = lambda fn: fn.lower(params, tokens, valid).compile().memory_analysis().temp_size_in_bytes
    # [B, T, V] f32 logits dominate: four chunks hold a quarter of them at a time.
    assert temp(chunked) < 0.5 * temp(whole), (temp(chunked), temp(whole))


def test_echo_grad_norm_is_micro_batched_and_exact():
    from echorl_jax.rl.echo import EchoConfig

    graphdef, params, tokens, valid, t = _model_and_batch()
    b = tokens.shape[0]
    mask = valid[:, -t:]
    echo_mask = mask & (jnp.arange(t)[None] < 5) & (jnp.arange(b)[:, None] % 3 == 0)
    z = jnp.zeros((b, t))
    batch = update.UpdateBatch(tokens, valid, mask, z, z, z, echo_mask)
    cfg = EchoConfig(enabled=True)
    whole = update.make_echo_grad_norm(graphdef, cfg, 1.0, 1)
    chunked = update.make_echo_grad_norm(graphdef, cfg, 1.0, 4)
    np.testing.assert_allclose(float(chunked(params, batch)), float(whole(params, batch)), rtol=1e-5)
    temp = lambda fn: fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp(chunked) < 0.5 * temp(whole), (temp(chunked), temp(whole))
