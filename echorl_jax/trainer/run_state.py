"""One workdir holds one run: start clean or resume the *same* run, never mix two.

Two rules, applied at start-up before anything is trained:

* ``train.resume=False`` in a workdir that already holds a run: the old run's
  files (checkpoints, metrics, TensorBoard, report, export) are moved into
  ``workdir/previous_runs/<time>/`` and the new run starts from an empty state.
  Orbax would otherwise skip the new run's saves (steps <= the latest on disk)
  and the next resume would pick up the *old* run.
* Resuming compares the config saved with the run against the current one.
  Settings that change what is trained (model, data, objective, EchoRL,
  optimizer, sampling, seeds ...) must match; the ones that only decide how long
  the run goes and what it logs may change (``RESUMABLE_CHANGES``). A mismatch
  raises ``ResumeMismatch`` with a readable diff and the two ways out.

The warm-start cache (``workdir/warmstart``) and comparison runs
(``workdir/compare``) are not part of the run and stay where they are.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping

import jax

from echorl_jax.config import ConfigError
from echorl_jax.trainer import storage

# Files and directories one run writes into its workdir.
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "hf_export", "peft_adapter", "report.md", "config.json")
RUN_FILE_SUFFIXES = (".png",)
PREVIOUS = "previous_runs"

# Dotted keys (or section prefixes ending in ".") that may differ between a run and its resumption.
RESUMABLE_CHANGES = (
    "train.steps", "train.workdir", "train.resume", "train.log_every", "train.eval_every", "train.eval_samples",
    "train.eval_temperature", "train.save_every", "train.keep_checkpoints", "train.progress", "train.export_hf",
    "train.echo_grad_norm_every", "train.mismatch_every", "data.eval", "data.num_eval_per_level", "mesh.", "sft.cache_dir",
    "model.remat", "model.attention", "model.logits_chunk", "train.checkpoint_dir", "dist.",
    "sampling.slots", "sampling.prompt_buckets", "sampling.kv_cache_memory",  # same rollouts, other schedule
    "sampling.decode_tensor_parallel",  # same rollouts up to rounding (bf16 sums in another order), like mesh.
    "rl.pack_rows_per_micro_batch",  # same losses and gradients, other learner layout (packed rows)
    "train.collapse_guard", "train.max_nonfinite_updates",  # how the run watches itself
)  # fmt: skip


class ResumeMismatch(ConfigError):
    """The workdir holds a run made with different settings."""


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved, current) for every setting that changed and must not change on resume.

    Keys present on one side only (a field added or removed by a newer version of
    the code) are not compared: there is nothing to compare them with.
    """
    a, b = _flatten(saved), _flatten(json.loads(json.dumps(current)))
    return [(k, a[k], b[k]) for k in sorted(set(a) & set(b)) if a[k] != b[k] and not _may_change(k)]


def mismatch_message(workdir: str, step: int, what: str) -> str:
    return (
        f"train.workdir={workdir!r} holds a run saved at step {step} that this config cannot continue:\n{what}\n"
        f"Either run in a new workdir (--config.train.workdir=runs/NAME) or start this workdir afresh "
        f"(--config.train.resume=false: the old run is moved to {os.path.join(workdir, PREVIOUS)}/)."
    )


def check_resume(saved: Mapping[str, Any] | None, current: Mapping[str, Any], workdir: str, step: int) -> None:
    """Raises ``ResumeMismatch`` when ``current`` changes a setting of the ``saved`` run."""
    if not saved:
        return  # a checkpoint from before configs were saved: nothing to compare
    diff = config_diff(saved, current)
    if diff:
        lines = "\n".join(f"  {k}: {a!r} (saved) -> {b!r} (now)" for k, a, b in diff)
        raise ResumeMismatch(mismatch_message(workdir, step, "settings changed since it was saved:\n" + lines))


def existing_run_files(workdir: str) -> list[str]:
    names = [n for n in storage.listdir(workdir) if n in RUN_FILES or n.endswith(RUN_FILE_SUFFIXES)]
    # An empty directory (the checkpoint manager creates its own on start-up) holds nothing of a run.
    return [n for n in names if not (storage.isdir(p := storage.join(workdir, n)) and not storage.listdir(p))]


def move_previous_run(workdir: str, log: Callable[[str], None]) -> str | None:
    """Moves an earlier run's files aside (process 0; every process waits). Returns where they went."""
    dest = None
    if jax.process_index() == 0:
        names = existing_run_files(workdir)
        if names:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            dest = storage.join(workdir, PREVIOUS, stamp)
            n = 1
            while storage.exists(dest):  # two fresh starts within one second
                n += 1
                dest = storage.join(workdir, PREVIOUS, f"{stamp}-{n}")
            storage.makedirs(dest)
            for name in names:
                storage.move(storage.join(workdir, name), storage.join(dest, name))
            log(f"train.resume=false: moved the previous run in {workdir} ({', '.join(names)}) to {dest}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("echorl: previous run moved aside")
    return dest


def write_config(workdir: str, cfg_dict: Mapping[str, Any]) -> None:
    """The run's resolved config, readable without loading a checkpoint (process 0)."""
    if jax.process_index() != 0:
        return
    storage.write_text(storage.join(workdir, "config.json"), json.dumps(cfg_dict, indent=1, default=str))
