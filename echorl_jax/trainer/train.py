"""The RL loop: a rollout source yields scored batches, a learning step consumes them. Per step:

    source.next(params, step) -> ScoredBatch      sample (jit) -> verify (host) -> score (jit), every token
                                                  tagged with its policy version (trainer/rollout_source.py)
    learn(state, batch, step) -> Learned          learner passes -> K epochs x minibatches of train_step (jit)
                                                  -> metrics (trainer/learn_step.py)
    -> log, collapse guard -> eval every ``train.eval_every`` -> Orbax checkpoint every ``train.save_every``

The source is synchronous (``rl.max_staleness = 0``: sampling and learning use the same parameters) or
streaming (trainer/stream_source.py: rollouts carried across steps under the staleness bound); either way
once per step the sampler gets a copy of ``state.params`` in the compute dtype, laid out for decoding
(sampling/layout.py); there is no second engine and no second loop. With a sampler mesh of its own
(``mesh.sampler_devices``) that copy is a push to the sampler's devices, and a streaming source decodes the
next step's batch there while the learner's updates run (``learn(..., during_update=source.overlap)``). This module keeps what belongs to the run: opening or resuming it,
logging, guards, evaluation, checkpoints and preemption.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import time
from typing import Any

import jax

from echorl_jax import config as config_lib, sharding
from echorl_jax.data.formats import DataError
from echorl_jax.rl.update import TrainState
from echorl_jax.trainer import adapters, checkpoint as ckpt_lib, grading, run_state, storage
from echorl_jax.trainer.guard import Guard, NonFinite
from echorl_jax.trainer.learn_step import make_learn_step
from echorl_jax.trainer.metrics_log import MetricsLog, to_python
from echorl_jax.trainer.rollout_source import RolloutSource
from echorl_jax.trainer.stream_source import make_source
from echorl_jax.trainer.setup import Setup, build_setup


class _Preemption:
    """SIGTERM sets a flag; the loop saves and exits at the end of the step."""

    def __init__(self):
        self.requested = False
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None

    def _handle(self, *_):
        self.requested = True

    def sync(self) -> bool:
        """Whether any process got SIGTERM (one all-gather per step when multi-process), so that every
        process saves the same step and exits together."""
        if jax.process_count() > 1:
            self.requested = sharding.any_process(self.requested)
        return self.requested

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def run_eval(s: Setup, params, step: int) -> dict[str, float]:
    if s.eval_pipeline is None:
        return {}
    s.eval_pipeline.set_state(s.eval_initial_state)
    rng = jax.random.fold_in(jax.random.key(s.cfg.train.seed + 1), step)
    t0 = time.perf_counter()
    got = grading.evaluate(  # one decode copy for the whole evaluation, dropped after it (LoRA: of the adapters)
        s.eval_sample, s.decode_weights(s.eval_sample, params), s.eval_pipeline, s.eval_records, s.verifier, s.tokenizer,
        k=s.cfg.train.eval_samples, rng=rng,
    )  # fmt: skip
    return {**got, "time/eval": time.perf_counter() - t0}  # the first includes compiling the held-out sampler


def _open_run(s: Setup, state: TrainState) -> tuple[int, TrainState, ckpt_lib.Checkpointer, dict]:
    """A fresh run in a clean workdir, or the exact continuation of the run saved there (trainer/run_state.py);
    the last item is the checkpoint's JSON part (``{}`` for a fresh run)."""
    tc = s.cfg.train
    directory = tc.checkpoint_dir or storage.join(tc.workdir, "checkpoints")
    checkpointer = ckpt_lib.Checkpointer(directory, keep=tc.keep_checkpoints)
    latest = checkpointer.latest_step()
    if not tc.resume or latest is None:
        if tc.checkpoint_dir and latest is not None:  # not ours to move aside (often gs://)
            checkpointer.close()
            raise run_state.ResumeMismatch(
                f"train.resume=false but train.checkpoint_dir={tc.checkpoint_dir!r} holds checkpoints (step "
                f"{latest}); give a new train.checkpoint_dir or delete that one (gcloud storage rm -r DIR)")
        # Process 0 writes the run files, so its answer decides for all (every process takes the same branch).
        old = run_state.existing_run_files(tc.workdir) if jax.process_index() == 0 else []
        if sharding.any_process(bool(old)):  # resume=false, or a run that never saved
            checkpointer.close()
            run_state.move_previous_run(tc.workdir, s.log)
            checkpointer = ckpt_lib.Checkpointer(directory, keep=tc.keep_checkpoints)
        run_state.write_config(tc.workdir, config_lib.to_dict(s.cfg))
        return 0, state, checkpointer, {}

    def check(step, host):
        run_state.check_resume(host.get("config"), config_lib.to_dict(s.cfg), tc.workdir, step)
        if s.base_identity is not None:  # LoRA adapters fit only the base they were trained on
            adapters.check_base(host.get("lora_base"), s.base_identity, tc.workdir, step)

    try:  # the newest checkpoint that reads back (a truncated newer one is moved aside with a warning)
        start, state, host = checkpointer.restore_newest(state, check, s.log)
        s.train_pipeline.set_state(host["data"])
    except (ckpt_lib.CheckpointError, DataError) as e:
        raise run_state.ResumeMismatch(run_state.mismatch_message(tc.workdir, latest, str(e))) from None
    s.log(f"resumed from step {start} in {checkpointer.directory}")
    return start, state, checkpointer, host


def _log_line(step: int, row: dict, last_eval: dict) -> str:
    acc = next((f" held-out {k} {v:.3f}" for k, v in last_eval.items() if k.startswith("avg@") and "/" not in k), "")
    loss = row.get("loss", 0)  # None: a NaN/Inf update (skipped)
    return (f"step {step}: reward {row.get('reward/mean', 0):.3f} accuracy {row.get('accuracy', 0):.3f} "
            f"loss {float('nan') if loss is None else loss:.4g} clips {row.get('echo/num_clips', 0):.0f}{acc}")  # fmt: skip


# What build_setup bakes into a Setup (model and warm start, data pipelines, samplers, verifier, optimizer
# and its schedule length, the reference copy): a setup can be reused for a config that differs elsewhere.
SETUP_SECTIONS = ("model", "mesh", "dist", "data", "task", "sampling", "rl", "reward", "optim", "sft")
SETUP_KEYS = ("objective.expert_per_group", "train.steps", "train.eval_temperature", "train.eval_samples",
              "echo.delimiter_ids")


def setup_for(cfg: config_lib.Config, setup: Setup) -> Setup:
    """``setup`` with ``cfg`` as its config, or a ConfigError naming what the setup was built with instead."""
    if setup.cfg == cfg:
        return setup
    a, b = config_lib.to_dict(setup.cfg), config_lib.to_dict(cfg)
    diff = [f"{sec}: {a[sec]} vs {b[sec]}" for sec in SETUP_SECTIONS if a[sec] != b[sec]]
    for key in SETUP_KEYS:
        sec, name = key.split(".")
        if a[sec][name] != b[sec][name]:
            diff.append(f"{key}: {a[sec][name]!r} vs {b[sec][name]!r}")
    if cfg.echo.enabled and setup.delimiter_ids.size == 0:
        diff.append("echo.enabled: the setup's tokenizer has no token containing a newline")
    if (setup.ref_params is None) != (cfg.objective.kl_coef == 0):
        diff.append(f"objective.kl_coef: {setup.cfg.objective.kl_coef!r} vs {cfg.objective.kl_coef!r} (reference copy)")
    if diff:
        raise config_lib.ConfigError("train(cfg, setup=...): the setup was built from a config that differs where "
                                     "the setup fixed it (setup's vs cfg's):\n  " + "\n  ".join(diff))
    return dataclasses.replace(setup, cfg=cfg)


def train(cfg: config_lib.Config, *, setup: Setup | None = None) -> dict[str, Any]:
    """Runs ``cfg.train.steps`` RL steps (resuming from the workdir if a checkpoint exists).

    ``setup`` (a previous run's ``out["setup"]``) skips building the model, data and samplers again;
    ``cfg`` may differ from the setup's in the objective, echo and run settings (workdir, seed, ...).
    A reused setup holds what its last run ended with: a resumed run replaces it from the checkpoint (params,
    optimizer, data position), but a fresh run starts from those weights and that data position, not from
    the warm start and the first batch.
    """
    s = build_setup(cfg) if setup is None else setup_for(cfg, setup)
    tc = cfg.train
    k = cfg.objective.expert_per_group  # LUFFY expert rows per group
    if k and s.experts is None:
        raise ValueError(f"objective.expert_per_group={k} but the setup was built without expert responses")
    start, state, checkpointer, host = _open_run(s, s.state)
    log = MetricsLog(tc.workdir, resume_step=start)
    source: RolloutSource = make_source(s)  # synchronous, or streaming with rl.max_staleness >= 1
    if host.get("stream"):  # the in-flight rollouts of a streaming run's checkpoint
        source.restore(lambda target: checkpointer.read_stream(target, start), state.params, host["stream"])
    learn = make_learn_step(s, state)
    preempt = _Preemption()
    guard = Guard(tc.collapse_guard, s.log)
    guard.load(host.get("guard"))  # the run's own history: a collapse that spans a restart is still seen
    nonfinite = NonFinite(tc.max_nonfinite_updates)
    last_eval: dict[str, float] = {}
    if start == 0:
        last_eval = log.write(0, run_eval(s, state.params, 0), kind="eval")
        guard.update(last_eval, "eval")
    bar = s.progress(start, tc.steps)
    step = saved = start
    stopping = False  # SIGTERM on any process (decided together at the end of a step)
    stop_why = ""  # the collapse guard (train.collapse_guard=stop) or non-finite updates stopped the run
    lora_host = {"lora_base": s.base_identity} if s.base_identity is not None else {}  # LoRA: the base's identity

    def save():
        log.flush()  # a bucket's metrics.jsonl holds every row up to the checkpoint a restart resumes from
        stream, stream_host = source.checkpoint()  # streaming: the in-flight rollouts
        host = {"data": s.train_pipeline.get_state(), "config": config_lib.to_dict(cfg), "guard": guard.state(),
                **lora_host, "stream": stream_host}
        checkpointer.save(step, state, host, **({} if stream is None else {"stream": stream}))

    for step in range(start + 1, tc.steps + 1):
        t_step = time.perf_counter()
        batch = source.next(state.params, step)
        # a sampler mesh of its own (mesh.sampler_devices, streaming) decodes the next batch during the update
        overlap = functools.partial(source.overlap, step) if hasattr(source, "overlap") else None
        t_learn = time.perf_counter()
        state, metrics, skipped = learn(state, batch, step, overlap)
        metrics["time/step"] = time.perf_counter() - t_step
        if "time/both_busy" in metrics:  # the step's timeline: the learner starts after the batch is in
            metrics["time/learn_start"] = t_learn - t_step
            metrics["time/both_busy_frac"] = metrics["time/both_busy"] / metrics["time/step"]
        # Every generated token over the time of every sampling round (DAPO may draw several).
        metrics["tokens_per_s"] = batch.sampled_tokens / max(batch.timings.get("sample", 0.0), 1e-9)
        if step % tc.log_every == 0 or step == tc.steps:
            row = log.write(step, metrics)
            if not bar.enabled:
                s.log(_log_line(step, row, last_eval))
        else:
            row = to_python(metrics)
        stop_why = "collapse guard" if guard.update(row) else ""
        if nonfinite.update(skipped):
            stop_why = f"{nonfinite.in_a_row} non-finite updates in a row (train.max_nonfinite_updates)"
        if tc.eval_every > 0 and step % tc.eval_every == 0 and step != tc.steps:
            last_eval = log.write(step, run_eval(s, state.params, step), kind="eval")
            if guard.update(last_eval, "eval") and not stop_why:
                stop_why = "collapse guard"
        bar.update(row, last_eval)
        stopping = preempt.sync()
        if stopping or stop_why or (tc.save_every > 0 and step % tc.save_every == 0):
            save()
            saved = step
        if stopping or stop_why:
            s.log(f"{'SIGTERM' if stopping else stop_why}: saved step {step}, exiting")
            break
    stopped = stopping or bool(stop_why)
    if not stopped:
        # Also after a resume at the last step (a run preempted there never evaluated it).
        if not log.has(tc.steps, "eval"):
            last_eval = log.write(tc.steps, run_eval(s, state.params, tc.steps), kind="eval")
        elif start == tc.steps:
            last_eval = log.last("eval")
        if step != saved:
            save()
    checkpointer.close()
    bar.close()
    preempt.restore()
    log.close()
    s.state = state
    if tc.export_hf and not stopped:  # every host joins the gather; process 0 writes
        if s.frozen is not None:  # LoRA: the adapters in PEFT's format; the merged model on request
            s.export_adapter(storage.join(tc.workdir, "peft_adapter"))
        if s.frozen is None or cfg.model.lora.export_merged:
            s.export(storage.join(tc.workdir, "hf_export"))
    return {"step": step, "eval": last_eval, "workdir": tc.workdir, "setup": s}
