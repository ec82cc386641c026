"""Faults a long run meets, each shown to lose nothing and hang nowhere: NaN/Inf updates, a truncated newest
checkpoint, a full disk during a save, a collapse that spans a restart. The quick tests drive the pieces
directly; the ``slow`` ones drive the trainer end to end (CI runs them)."""

from __future__ import annotations

import glob
import os
import resource
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echorl_jax.rl import update
from echorl_jax.rl.update import TrainState
from echorl_jax.trainer import checkpoint as ckpt_lib, rollout as rollout_lib, rollout_source, run_state, train
from echorl_jax.trainer.checkpoint import Checkpointer, CheckpointError
from echorl_jax.trainer.guard import Guard, NonFinite
from echorl_jax.trainer.metrics_log import read_jsonl
from tests.test_train import _params, _rows, tiny_cfg

# ----------------------------------------------------------------------------- NaN / Inf updates


def _toy_state(scale):
    return TrainState(jnp.int32(3), {"w": jnp.full((4, 2), scale)}, {"mu": jnp.full((4, 2), 2 * scale)})


@pytest.mark.parametrize("loss,grad_norm,skipped", [(1.0, 2.0, 0.0), (np.nan, 2.0, 1.0), (1.0, np.inf, 1.0),
                                                     (-np.inf, np.nan, 1.0)])  # fmt: skip
def test_skip_nonfinite_keeps_the_whole_old_state(loss, grad_norm, skipped):
    old, new = _toy_state(1.0), _toy_state(5.0)._replace(step=jnp.int32(4))
    state, m = jax.jit(update.skip_nonfinite)(old, new, {"loss": jnp.float32(loss), "grad_norm": jnp.float32(grad_norm)})
    want = old if skipped else new
    jax.tree.map(np.testing.assert_array_equal, state, want)
    assert float(m["skipped_updates"]) == skipped


def test_train_step_skips_a_nan_update_and_takes_a_finite_one():
    """The real train step: NaN advantages leave params, Adam moments and the step count untouched."""
    from flax import nnx

    from echorl_jax.models.config import ModelConfig
    from echorl_jax.models.transformer import Transformer
    from echorl_jax.rl.echo import EchoConfig
    from echorl_jax.rl.objectives import ObjectiveConfig

    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, attention_bias=False, tie_embeddings=True)  # fmt: skip
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    opt = update.make_optimizer(type("O", (), dict(learning_rate=1e-2, schedule="constant", warmup_steps=0,
                                                   min_lr_ratio=0.0, weight_decay=0.0, b1=0.9, b2=0.99, eps=1e-8,
                                                   max_grad_norm=1.0)), 10)  # fmt: skip
    step = jax.jit(update.make_train_step(graphdef, opt, ObjectiveConfig(), EchoConfig(), micro_batches=1,
                                          temperature=1.0))  # fmt: skip
    rng = np.random.default_rng(0)
    B, P, T = 4, 3, 5
    mask = np.ones((B, T), bool)
    batch = update.UpdateBatch(jnp.asarray(rng.integers(1, 32, (B, P + T)), jnp.int32), jnp.ones((B, P + T), bool),
                               jnp.asarray(mask), jnp.asarray(rng.normal(size=(B, T)), jnp.float32),
                               jnp.full((B, T), -1.0), jnp.zeros((B, T)), jnp.zeros((B, T), bool))  # fmt: skip
    state = TrainState(jnp.int32(0), params, opt.init(params))
    before = jax.tree.map(np.asarray, state)
    bad = batch._replace(adv_bt=batch.adv_bt.at[0, 0].set(jnp.nan))
    skipped, m = step(state, bad)
    assert float(m["skipped_updates"]) == 1.0 and not np.isfinite(float(m["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, skipped), before)
    taken, m = step(skipped, batch)
    assert float(m["skipped_updates"]) == 0.0 and int(taken.step) == 1
    assert not np.array_equal(np.asarray(jax.tree.leaves(taken.params)[0]), np.asarray(jax.tree.leaves(before.params)[0]))


def test_nonfinite_counter_stops_after_n_in_a_row():
    c = NonFinite(3)
    assert not c.update([1.0, 1.0]) and not c.update([0.0]) and c.in_a_row == 0
    assert not c.update([1.0]) and not c.update([1.0]) and c.update([1.0])
    assert not NonFinite(0).update([1.0] * 50)  # 0: never stop


# ----------------------------------------------------------------------------- collapse guard across a restart


def test_guard_state_round_trip_sees_a_collapse_that_spans_a_restart():
    """Accuracy 0.8 at step 1, then 0: a straight run fires at step 6; a run restarted after step 3 with the saved
    state fires there too, a fresh guard (what a resume built before) never does."""
    rows = [{"accuracy": 0.8 if step == 1 else 0.0, "entropy/mean": 1.0, "extra": step} for step in range(1, 7)]

    def fires_at(guard, rows, first_step):
        for step, row in enumerate(rows, first_step):
            if guard.update(row):
                return step
        return None

    assert fires_at(Guard("stop", lambda _: None), rows, 1) == 6
    before = Guard("stop", lambda _: None)
    assert fires_at(before, rows[:3], 1) is None
    state = before.state()
    assert all(set(r) <= {"accuracy", "entropy/mean"} for r in state["train"])  # only what the rules read
    import json

    after = Guard("stop", lambda _: None)
    after.load(json.loads(json.dumps(state)))  # through the checkpoint's JSON
    assert fires_at(after, rows[3:], 4) == 6
    assert fires_at(Guard("stop", lambda _: None), rows[3:], 4) is None


# ----------------------------------------------------------------------------- checkpoints: corruption, full disk


def _toy(scale):
    return {"a": jnp.arange(512.0) * scale, "b": jnp.full((32, 32), scale)}


def _saved(directory, steps=(1, 2), keep=3):
    c = Checkpointer(str(directory), keep=keep)
    for s in steps:
        c.save(s, _toy(s), {"step": s})
    c.close()


def _truncate_data(step_dir):
    """Cuts every data file of the checkpoint's train state to half (one file alone was not enough: which arrays
    its second half holds depends on the order of Orbax's asynchronous writes, so a restore could still succeed)."""
    for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2])


def test_truncated_newest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path):
    _saved(tmp_path)
    _truncate_data(tmp_path / "2")
    lines, checked = [], []
    c = Checkpointer(str(tmp_path))
    step, state, host = c.restore_newest(_toy(0), lambda s, h: checked.append((s, h)), lines.append)
    assert step == 1 and host == {"step": 1} and checked == [(2, {"step": 2}), (1, {"step": 1})]
    np.testing.assert_array_equal(state["a"], np.arange(512.0))
    assert len(lines) == 1 and "checkpoint step 2" in lines[0] and "resumed from step 1" in lines[0]
    moved = [n for n in os.listdir(tmp_path) if n.startswith("2.corrupt-")]
    assert moved and c.all_steps() == [1]  # moved aside: the next save of step 2 does not collide with it
    c.save(2, _toy(7), {"step": 2})
    c.close()
    assert Checkpointer(str(tmp_path)).restore(_toy(0))[0] == 2


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    _saved(tmp_path)
    _truncate_data(tmp_path / "2")
    (tmp_path / "1" / "host" / "metadata").write_text("{trunc")
    with pytest.raises(CheckpointError, match=r"no checkpoint .* can be read back:\n  step 2: .*\n  step 1: "):
        Checkpointer(str(tmp_path)).restore_newest(_toy(0), lambda s, h: None, print)
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # nothing moved or deleted


def test_a_config_mismatch_is_not_taken_for_corruption(tmp_path):
    _saved(tmp_path)

    def refuse(step, host):
        raise run_state.ResumeMismatch(f"changed (step {step})")

    with pytest.raises(run_state.ResumeMismatch, match="step 2"):
        Checkpointer(str(tmp_path)).restore_newest(_toy(0), refuse, print)


class _FileSizeLimit:
    """Writes past ``limit`` bytes fail with an OS error (EFBIG), in Python and in TensorStore's threads: what a
    full disk (ENOSPC) does to a save."""

    def __init__(self, limit):
        self.limit = limit

    def __enter__(self):
        self.sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.old[1]))

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_FSIZE, self.old)
        signal.signal(signal.SIGXFSZ, self.sig)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's failed background threads
def test_a_save_that_cannot_write_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path):
    _saved(tmp_path, steps=(1,), keep=1)
    c = Checkpointer(str(tmp_path), keep=1)
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 2 .* failed: .*File too large.*newest complete "
                                              r"checkpoint is step 1 \(intact"):  # fmt: skip
        with _FileSizeLimit(1024):
            c.save(2, _toy(2), {"step": 2})
            c.wait()  # async: the write fails in the background
    step, state, host = Checkpointer(str(tmp_path)).restore(_toy(0))
    assert step == 1 and host == {"step": 1}  # keep=1 did not delete it for the save that failed
    np.testing.assert_array_equal(state["b"], np.ones((32, 32)))


# ----------------------------------------------------------------------------- the trainer, end to end


def _with_accuracy(monkeypatch, accuracy_by_step):
    """Train rows whose accuracy is scripted by step (the rest is the real run's)."""
    rollout_metrics = rollout_source.rollout_metrics
    steps = iter(range(1, 1000))

    def scripted(*args, **kwargs):
        return dict(rollout_metrics(*args, **kwargs), accuracy=accuracy_by_step(next(steps)))

    monkeypatch.setattr(rollout_source, "rollout_metrics", scripted)


@pytest.mark.slow  # 12 tiny RL steps (~1 min on 2 shared cores); CI runs it
def test_a_collapse_that_spans_a_resume_stops_the_run_where_a_straight_run_stops(tmp_path, monkeypatch, capsys):
    """The issue's reproducer: accuracy 0.8 at step 1, then 0. A straight run with collapse_guard=stop stops at
    step 6; so does one resumed after step 3 (before the fix the resumed guard saw steps 4-6 only, and ran on)."""
    acc = lambda step: 0.8 if step == 1 else 0.0  # noqa: E731
    cfg = lambda w, steps: tiny_cfg(w, train={"steps": steps, "collapse_guard": "stop", "export_hf": False,  # noqa: E731
                                              "eval_every": 0})
    _with_accuracy(monkeypatch, acc)
    straight = train.train(cfg(tmp_path / "a", 8))
    assert straight["step"] == 6 and "collapse guard: saved step 6" in capsys.readouterr().out
    _with_accuracy(monkeypatch, acc)
    assert train.train(cfg(tmp_path / "b", 3))["step"] == 3
    _with_accuracy(monkeypatch, lambda step: acc(step + 3))
    resumed = train.train(cfg(tmp_path / "b", 8))
    assert resumed["step"] == 6 and "collapse guard: saved step 6" in capsys.readouterr().out
    assert Checkpointer(str(tmp_path / "b" / "checkpoints")).latest_step() == 6
    assert [r["step"] for r in _rows(tmp_path / "b")] == [1, 2, 3, 4, 5, 6]


def _nan_advantages_at(monkeypatch, bad_steps):
    make_scorer = rollout_lib.make_scorer

    def scorer(*args, **kwargs):
        score, calls = make_scorer(*args, **kwargs), iter(range(1, 1000))

        def maybe_nan(ro, reward_ng):
            reward, adv, clips = score(ro, reward_ng)
            return reward, (adv * np.nan if next(calls) in bad_steps else adv), clips

        return maybe_nan

    monkeypatch.setattr(rollout_lib, "make_scorer", scorer)


@pytest.mark.slow  # 8 tiny RL steps; CI runs it
def test_nonfinite_updates_are_skipped_counted_warned_and_n_in_a_row_stop_with_a_checkpoint(tmp_path, monkeypatch,
                                                                                            capsys):
    """NaN advantages at steps 2, 4 and 5 with train.max_nonfinite_updates=2: step 2's update is skipped (the
    run goes on), 4 and 5 stop the run with a checkpoint that holds the parameters after step 3, exactly those
    of a run whose only bad step was 2."""
    opts = {"export_hf": False, "eval_every": 0, "max_nonfinite_updates": 2}
    _nan_advantages_at(monkeypatch, {2})
    ref = train.train(tiny_cfg(tmp_path / "ref", train={"steps": 3, **opts}))
    _nan_advantages_at(monkeypatch, {2, 4, 5})
    out = train.train(tiny_cfg(tmp_path / "run", train={"steps": 6, **opts}))
    log = capsys.readouterr().out
    assert out["step"] == 5 and "2 non-finite updates in a row (train.max_nonfinite_updates): saved step 5" in log
    assert "WARNING collapse guard [nonfinite]" in log
    rows = _rows(tmp_path / "run")
    assert [r["skipped_updates"] for r in rows] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert rows[1]["loss"] is None and rows[2]["loss"] is not None  # NaN is logged as null
    assert _rows(tmp_path / "ref") == rows[:3]
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    step, state, _ = ckpt.restore(out["setup"].state)
    assert step == 5 and int(state.step) == 2  # two updates taken (steps 1 and 3)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), _params(ref))
    assert not os.path.exists(tmp_path / "run" / "hf_export")  # a stopped run exports nothing


@pytest.mark.slow  # 7 tiny RL steps; CI runs it
def test_a_truncated_newest_checkpoint_resumes_from_the_one_before_exactly(tmp_path, capsys):
    opts = {"export_hf": False, "eval_every": 0, "save_every": 1}
    train.train(tiny_cfg(tmp_path / "a", train={"steps": 3, **opts}))
    train.train(tiny_cfg(tmp_path / "b", train={"steps": 2, **opts}))
    _truncate_data(str(tmp_path / "b" / "checkpoints" / "2"))
    out = train.train(tiny_cfg(tmp_path / "b", train={"steps": 3, **opts}))
    log = capsys.readouterr().out
    assert out["step"] == 3 and "WARNING checkpoint step 2" in log and "resumed from step 1" in log
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")  # steps 2 and 3 redone, nothing lost or doubled
    # Every checkpoint unreadable: a clear error, and nothing is started afresh or moved.
    for step in Checkpointer(str(tmp_path / "b" / "checkpoints")).all_steps():
        _truncate_data(str(tmp_path / "b" / "checkpoints" / str(step)))
    with pytest.raises(run_state.ResumeMismatch, match="no checkpoint .* can be read back"):
        train.train(tiny_cfg(tmp_path / "b", train={"steps": 4, **opts}))
    assert [(r["kind"], r["step"]) for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [
        ("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("eval", 3)]  # untouched


@pytest.mark.slow  # 4 tiny RL steps; CI runs it
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_full_disk_during_a_trainer_save_stops_with_a_clear_error_and_the_run_resumes(tmp_path, monkeypatch):
    opts = {"export_hf": False, "eval_every": 0, "save_every": 1, "keep_checkpoints": 1}
    save = ckpt_lib.Checkpointer.save

    def full_at_step_2(self, step, state, host):
        if step != 2:
            return save(self, step, state, host)
        self.wait()  # step 1's save, in the background, completes first: the disk fills during step 2's
        with _FileSizeLimit(1024):
            save(self, step, state, host)
            self.wait()

    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", full_at_step_2)
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 2 .*newest complete checkpoint is step 1"):
        train.train(tiny_cfg(tmp_path / "w", train={"steps": 3, **opts}))
    monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
    assert Checkpointer(str(tmp_path / "w" / "checkpoints")).latest_step() == 1  # keep=1 kept it
    out = train.train(tiny_cfg(tmp_path / "w", train={"steps": 3, **opts}))
    assert out["step"] == 3 and [r["step"] for r in _rows(tmp_path / "w")] == [1, 2, 3]


# ----------------------------------------------------------------------------- a process killed mid-step

KILL_PRELUDE = """
if os.environ.get("KILL_IN_STEP"):  # SIGKILL this process as it starts that step's rollouts (no handler runs)
    from echorl_jax.trainer import rollout
    collect, calls = rollout.collect, [0]
    def collect_or_die(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(os.environ["KILL_IN_STEP"]):
            os.kill(os.getpid(), 9)
        return collect(*args, **kwargs)
    rollout.collect = collect_or_die
"""


@pytest.mark.slow  # 2-process trainer runs (~2-4 min); CI runs it
@pytest.mark.parametrize("victim", [1, 0])  # a worker; the coordinator (process 0 hosts jax.distributed's service)
def test_a_process_killed_mid_step_stops_the_others_naming_it_and_a_rerun_resumes(tmp_path, victim):
    """SIGKILL at the start of step 3's rollouts: the survivor exits non-zero within seconds, naming the lost
    process; a rerun resumes from the newest complete checkpoint."""
    from multiproc import run_tool, start, wait

    from tests.test_pods import _reward_file, _train_args

    args = ["main", *_train_args(tmp_path / "run", _reward_file(tmp_path), steps=4, **{
        "train.save_every": 1, "train.eval_every": 0, "dist.heartbeat_timeout_s": 10})]  # fmt: skip
    env = [{"KILL_IN_STEP": "3"} if i == victim else {} for i in range(2)]
    out = wait(*start(tmp_path, f"kill{victim}", args, prelude=KILL_PRELUDE, per_process_env=env), timeout=400)
    survivor = 1 - victim
    assert out.codes[victim] == -signal.SIGKILL
    took = out.seconds[survivor] - out.seconds[victim]
    print(f"victim {victim}: survivor exit code {out.codes[survivor]} after {took:.1f} s")
    assert took < 30, took  # bounded by dist.heartbeat_timeout_s=10 (+ the check's margin); not a hang
    if victim == 1:
        assert out.codes[survivor] == 3, out.logs[survivor][-3000:]
        assert "error: lost process(es) [1] of 2" in out.logs[survivor]
        assert "Rerun every process to resume from the last checkpoint" in out.logs[survivor]
    else:  # the coordination service died with process 0: JAX's own monitor may stop the survivor first
        assert out.codes[survivor] != 0, out.logs[survivor][-3000:]
        assert ("error: lost process(es) [0] (the coordinator) of 2" in out.logs[survivor]
                or "the leader task was preempted/died" in out.logs[survivor]), out.logs[survivor][-3000:]
    # Step 2's save runs in the background while step 3 starts: Orbax commits it only when every process has
    # written, so it survives only if it finished before the kill. Step 1's was complete (the next save waits).
    latest = Checkpointer(str(tmp_path / "run" / "checkpoints")).latest_step()
    assert latest in (1, 2)
    if victim == 1:  # the rerun resumes from the newest complete checkpoint and finishes, each step once
        again = run_tool(tmp_path, "rerun", args)
        assert f"resumed from step {latest}" in again.logs[0]
        assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3, 4]
