"""Runs as child processes: several at once on one accelerator, each with its own log file.

Used by ``--compare --parallel N``. Each child gets ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (otherwise
the first would take 75 % of the GPU's memory) and, on a GPU, deterministic XLA ops. The first child
that fails stops the others and raises ``RunFailed`` with the tail of its log.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

import echorl_jax

DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
TAIL_LINES = 40


class RunFailed(RuntimeError):
    """A child run exited with a non-zero status."""


@dataclasses.dataclass(frozen=True)
class Job:
    name: str
    argv: tuple[str, ...]
    log_path: str
    env: Mapping[str, str]


def jax_platform() -> str:
    """JAX's default backend here ('cpu', 'gpu', 'tpu'), without starting it in this process.

    XLA reads ``XLA_FLAGS`` once, when JAX starts its backend, so a flag chosen from the platform must be
    set before that: a short child process answers instead (under a second on CPU).
    """
    if _jax_started():
        import jax

        return jax.default_backend()
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    got = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    if got.returncode != 0 or not got.stdout.strip():
        raise RunFailed(f"could not start JAX in a child process to find the platform:\n{_tail(got.stderr)}")
    return got.stdout.split()[-1]


def _jax_started() -> bool:
    from jax._src import xla_bridge

    started = getattr(xla_bridge, "backends_are_initialized", None)  # private: guard against its renaming
    return bool(started() if started else getattr(xla_bridge, "_backends", None))


def with_deterministic_ops(xla_flags: str) -> str:
    """``xla_flags`` with deterministic GPU ops on, unless the user already chose (=true or =false)."""
    if "--xla_gpu_deterministic_ops" in xla_flags:
        return xla_flags
    return f"{xla_flags} {DETERMINISTIC_FLAG}".strip()


def deterministic_ops_here() -> str:
    """On a GPU, turns on deterministic XLA ops for this process (call it before JAX starts its backend);
    returns the platform."""
    platform = jax_platform()
    if platform == "gpu":
        if _jax_started() and not is_deterministic(os.environ.get("XLA_FLAGS", "")):
            print("[echorl] warning: JAX started before deterministic GPU ops could be set; runs in this "
                  f"process are not reproducible (set XLA_FLAGS={DETERMINISTIC_FLAG} before starting Python)",
                  flush=True)  # fmt: skip
        os.environ["XLA_FLAGS"] = with_deterministic_ops(os.environ.get("XLA_FLAGS", ""))
    return platform


def set_cpu_devices(n: int) -> str:
    """Makes a CPU-only host ``n`` JAX devices (``mesh.cpu_devices``; 0 = leave JAX's default). Call it
    before JAX starts its backend; returns what happened, for the log ("" when nothing was asked).
    ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` is the user's own choice and wins."""
    if n <= 0:
        return ""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return f"mesh.cpu_devices={n} left to XLA_FLAGS, which sets --xla_force_host_platform_device_count"
    if _jax_started():
        return f"mesh.cpu_devices={n} not applied: JAX had already started (set it before, or use XLA_FLAGS)"
    import jax

    jax.config.update("jax_num_cpu_devices", n)
    return f"CPU devices: {n} (mesh.cpu_devices; used when the CPU is the platform)"


def is_deterministic(xla_flags: str) -> bool:
    return DETERMINISTIC_FLAG in xla_flags.split()


def child_env(platform: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child run: this one's, plus the settings that let several share a GPU and
    make each reproducible, plus this checkout of ``echorl_jax`` first on the path."""
    env = dict(os.environ if base is None else base)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # several runs share one GPU's memory
    env["PYTHONUNBUFFERED"] = "1"  # the log shows progress as it happens
    if platform == "gpu":
        env["XLA_FLAGS"] = with_deterministic_ops(env.get("XLA_FLAGS", ""))
    root = os.path.dirname(os.path.dirname(os.path.abspath(echorl_jax.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def write_config_file(path: str, values: Mapping) -> str:
    """A config file (``get_config()``) returning ``values``; JSON inside, so inf/nan survive."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    text = json.dumps(values, indent=1)
    with open(path, "w") as f:
        f.write(f'"""Written by --compare: the config of one run."""\n\nimport json\n\n\n'
                f"def get_config():\n    return json.loads({json.dumps(text)})\n")  # fmt: skip
    return path


def python_module(module: str, *args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", module, *args)


def run_all(jobs: Sequence[Job], parallel: int, log: Callable[[str], None] = print, poll_s: float = 0.2) -> None:
    """Runs ``jobs`` with at most ``parallel`` at a time, in order; returns when all succeeded.

    On the first failure the running ones are terminated and ``RunFailed`` names the job, its exit
    status and the end of its log.
    """
    pending, running = list(jobs), []  # running: (job, process, start time)
    try:
        while pending or running:
            while pending and len(running) < max(parallel, 1):
                job = pending.pop(0)
                os.makedirs(os.path.dirname(job.log_path) or ".", exist_ok=True)
                with open(job.log_path, "w") as out:  # the child keeps its own handle
                    running.append((job, subprocess.Popen(job.argv, stdout=out, stderr=subprocess.STDOUT,
                                                          env=dict(job.env)), time.perf_counter()))  # fmt: skip
                log(f"[compare] started {job.name} (log: {job.log_path})")
            for entry in list(running):
                job, proc, t0 = entry
                rc = proc.poll()
                if rc is None:
                    continue
                running.remove(entry)
                if rc != 0:
                    with open(job.log_path, errors="replace") as f:
                        tail = _tail(f.read())
                    raise RunFailed(f"{job.name} exited with status {rc}; the end of {job.log_path}:\n{tail}")
                log(f"[compare] finished {job.name} in {time.perf_counter() - t0:.0f} s")
            time.sleep(poll_s)
    finally:
        for _, proc, _ in running:  # a failure or Ctrl-C here: no orphaned runs
            proc.terminate()
        for _, proc, _ in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
