"""``mesh.cpu_devices``: a CPU-only host split into N JAX devices by the entry scripts, before JAX starts."""

from __future__ import annotations

import os
import subprocess
import sys

from echorl_jax import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = "from echorl_jax import launch; print(launch.set_cpu_devices({n})); import jax; print(jax.local_device_count())"


def _probe(n: int, xla_flags: str) -> list[str]:
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    got = subprocess.run([sys.executable, "-c", PROBE.format(n=n)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert got.returncode == 0, got.stderr[-2000:]
    return got.stdout.strip().splitlines()


def test_sets_the_device_count_before_jax_starts():
    said, count = _probe(3, "")
    assert count == "3" and "CPU devices: 3" in said


def test_zero_leaves_jax_alone():
    assert _probe(0, "") == ["1"]  # nothing said (an empty line), JAX's one CPU device


def test_xla_flags_choice_wins_and_is_said():
    said, count = _probe(2, "--xla_force_host_platform_device_count=3")
    assert count == "3" and "left to XLA_FLAGS" in said


def test_after_jax_started_it_says_it_was_not_applied(monkeypatch):
    import jax

    before = jax.local_device_count()  # this test process has started JAX (conftest's 8 devices)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    said = launch.set_cpu_devices(2)
    assert "not applied" in said and "mesh.cpu_devices=2" in said
    assert jax.local_device_count() == before
