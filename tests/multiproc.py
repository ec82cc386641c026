"""Run an echorl-jax tool as N processes x D CPU devices (jax.distributed on localhost, gloo collectives).

``run_tool(tmp_path, "tag", ["main", "--config", ...], processes=2, devices=4)`` starts every process,
waits for all and returns their exit codes and logs. ``PRELUDE`` code (e.g. the fake-GCS registration of
``tests/fake_gcs.py``) runs in every process before the tool; ``env`` adds environment variables.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from numbers import Number
from typing import NamedTuple

import pytest
from xla_flags import with_fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = """
import os, sys
sys.path.insert(0, os.path.join({root!r}, "tests"))
{prelude}
from echorl_jax import cli
sys.exit(cli.dispatch(sys.argv[1:]))
"""


class Finished(NamedTuple):
    codes: list[int]
    logs: list[str]
    seconds: list[float]  # wall time of each process, from the start of the first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(tmp_path, tag: str, argv: list[str], *, processes: int = 2, devices: int = 4, env: dict | None = None,
          prelude: str = "", per_process_env: list[dict] | None = None):
    """Starts the processes; returns ``(popens, log paths, t0)``."""
    port = free_port()
    procs, logs = [], []
    for i in range(processes):
        # compiled as in the test process (tests/xla_flags.py): these runs' time is mostly compiling tiny programs
        flags = with_fast_compile(f"--xla_force_host_platform_device_count={devices}")
        e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
                 JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"), PYTHONUNBUFFERED="1",
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", **(env or {}))  # fmt: skip
        for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            e.pop(k, None)
        if processes > 1:
            e.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                     JAX_PROCESS_ID=str(i))  # fmt: skip
        if per_process_env:
            e.update(per_process_env[i])
        logs.append(tmp_path / f"{tag}_p{i}.log")
        code = WORKER.format(root=ROOT, prelude=prelude)
        procs.append(subprocess.Popen([sys.executable, "-c", code, *argv], cwd=ROOT, env=e,
                                      stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT))  # fmt: skip
    return procs, logs, time.monotonic()


def wait(procs, logs, t0, timeout: float = 500) -> Finished:
    seconds = [0.0] * len(procs)
    deadline = t0 + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if p.poll() is not None and not seconds[i]:
                    seconds[i] = time.monotonic() - t0
            time.sleep(0.1)
    finally:
        for i, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
            if not seconds[i]:
                seconds[i] = time.monotonic() - t0
    return Finished([p.returncode for p in procs], [log.read_text() for log in logs], seconds)


def run_tool(tmp_path, tag: str, argv: list[str], *, processes: int = 2, devices: int = 4, env: dict | None = None,
             prelude: str = "", timeout: float = 500, check: bool = True) -> Finished:
    """Runs ``echorl-jax ARGV`` as ``processes`` x ``devices``; with ``check`` every process must exit 0."""
    out = wait(*start(tmp_path, tag, argv, processes=processes, devices=devices, env=env, prelude=prelude),
               timeout=timeout)  # fmt: skip
    if check:
        assert out.codes == [0] * processes, "\n\n".join(f"--- process {i}\n{t[-4000:]}" for i, t in enumerate(out.logs))
    return out


def metric_rows(workdir) -> list[dict]:
    """A run's metrics.jsonl rows without wall times (``time/*``, ``tokens_per_s``), which differ by nature."""
    from echorl_jax.trainer.metrics_log import read_jsonl

    drop = ("time/", "tokens_per_s")
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def assert_value_close(got, want, rel: float = 1e-5, abs: float = 1e-6, where=()) -> None:
    """A metric value: numbers up to float summation order, anything else (a ``kind`` string, None for a
    skipped update) exactly."""
    if isinstance(want, Number) and not isinstance(want, bool):
        assert got == pytest.approx(want, rel=rel, abs=abs), (*where, got, want)
    else:
        assert got == want, (*where, got, want)


def assert_rows_close(got: list[dict], want: list[dict], rel: float = 1e-5, abs: float = 1e-6) -> None:
    """Metric rows agree: the same rows and keys, every value as ``assert_value_close`` says."""
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    for g, w in zip(got, want):
        assert g.keys() == w.keys(), (g["kind"], g["step"], set(g) ^ set(w))
        for k in w:
            assert_value_close(g[k], w[k], rel, abs, (g["kind"], g["step"], k))


def assert_export_close(a, b, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """The HF exports of runs ``a`` and ``b`` (workdirs) hold the same weights up to float32 summation order
    over a few updates (weights ~1e-2; Adam's first steps amplify last-bit differences of small gradients)."""
    import numpy as np
    from safetensors.numpy import load_file

    want = load_file(os.path.join(a, "hf_export", "model.safetensors"))
    got = load_file(os.path.join(b, "hf_export", "model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=atol, err_msg=k)
