"""--compare: runs as concurrent child processes give exactly the numbers of the in-process runs, share
one warm start trained once, and get the environment that lets several share one GPU reproducibly."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from echorl_jax import compare, config as config_lib, launch
from echorl_jax.trainer.metrics_log import read_jsonl
from tests.test_train import ROOT, TINY


def test_deterministic_flag_is_added_once_and_a_users_choice_kept():
    assert launch.with_deterministic_ops("") == launch.DETERMINISTIC_FLAG
    assert launch.with_deterministic_ops("--a=1").split() == ["--a=1", launch.DETERMINISTIC_FLAG]
    assert launch.with_deterministic_ops("--xla_gpu_deterministic_ops=false") == "--xla_gpu_deterministic_ops=false"
    assert launch.is_deterministic(launch.with_deterministic_ops("--a=1"))


def test_child_env_shares_the_gpu_and_is_deterministic_only_on_a_gpu():
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PYTHONPATH": "/elsewhere"}
    gpu, cpu = launch.child_env("gpu", base), launch.child_env("cpu", base)
    assert gpu["XLA_PYTHON_CLIENT_PREALLOCATE"] == cpu["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert gpu["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", launch.DETERMINISTIC_FLAG]
    assert cpu["XLA_FLAGS"] == base["XLA_FLAGS"]
    assert gpu["PYTHONPATH"].split(os.pathsep) == [ROOT, "/elsewhere"]  # this checkout's echorl_jax first


def test_a_failing_child_stops_the_others_and_reports_its_log_tail(tmp_path):
    def job(name, code):
        return launch.Job(name, (sys.executable, "-c", code), str(tmp_path / f"{name}.log"), dict(os.environ))

    never = str(tmp_path / "never")
    slow = job("slow", f"import time; time.sleep(60); open({never!r}, 'w')")
    bad = job("bad", "import sys; print('line one'); print('the cause'); sys.exit(3)")
    t0 = time.perf_counter()
    with pytest.raises(launch.RunFailed, match=r"(?s)bad exited with status 3.*the cause"):
        launch.run_all([slow, bad, job("unstarted", f"open({never!r}, 'w')")], parallel=2, log=lambda _: None)
    assert time.perf_counter() - t0 < 30  # the slow one was terminated, not waited for
    assert not os.path.exists(never) and not (tmp_path / "unstarted.log").exists()


def _given(workdir) -> dict:
    # A 5-step warm start (so the shared cache is exercised) and one RL step.
    return config_lib.merge_given(config_lib.load_config_file(TINY), {
        "sft": {"steps": 5}, "train": {"steps": 1, "workdir": str(workdir)}})  # fmt: skip


def _evals(workdir) -> dict:
    with open(os.path.join(workdir, "compare.json")) as f:
        runs = json.load(f)["runs"]
    # The final held-out evaluation of every run, without its wall-clock fields.
    return {name: {k: v for k, v in r["0"]["eval"].items() if "time" not in k} for name, r in runs.items()}


def _rows(workdir, name) -> list[dict]:
    """Every metrics row of one run, without its wall-clock fields."""
    rows = read_jsonl(os.path.join(workdir, "compare", name, "seed0", "metrics.jsonl"))
    return [{k: v for k, v in r.items() if "time" not in k and k != "tokens_per_s"} for r in rows]


@pytest.mark.slow  # a long end-to-end run: CI runs it (python -m pytest -q -m slow)
def test_concurrent_runs_match_the_in_process_runs_and_share_one_warm_start(tmp_path, monkeypatch):
    seq, par = tmp_path / "seq", tmp_path / "par"
    given = _given(seq)
    compare.run(config_lib.build_config(given), given, seeds=(0,), parallel=1, platform="cpu", methods=("grpo",))

    # Reported as a GPU: the children must get deterministic ops (a no-op on this CPU).
    monkeypatch.setattr(launch, "jax_platform", lambda: "gpu")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".jax_cache"))  # as conftest, for speed
    jobs = []
    run_all = launch.run_all
    monkeypatch.setattr(launch, "run_all", lambda js, n, **kw: (jobs.extend(js), run_all(js, n, **kw)))
    given = _given(par)
    compare.run(config_lib.build_config(given), given, seeds=(0,), parallel=2, methods=("grpo",))

    assert [j.name for j in jobs] == ["warm start", "grpo seed 0", "grpo+echo seed 0"]
    for j in jobs:
        assert j.env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
        assert launch.DETERMINISTIC_FLAG in j.env["XLA_FLAGS"].split()
    expected = _evals(seq)
    assert set(expected) == {"grpo", "grpo+echo"} and all("avg@2" in e for e in expected.values())
    assert _evals(par) == expected  # exactly: same warm start, same programs, CPU is deterministic
    # The tiny model's accuracy is 0 either way; its entropy, lengths and losses tell the weights apart.
    for name in expected:
        assert _rows(par, name) == _rows(seq, name) and any("entropy/mean" in r for r in _rows(seq, name))

    # The warm start was trained once, by its own process, before the runs; each run loaded it.
    (entry,) = os.listdir(par / "warmstart")  # one cache entry, no temp dir left
    assert "reused the cached result" not in (par / "compare" / "warmstart.log").read_text()
    for name in ("grpo", "grpo+echo"):
        assert "warm start: reused the cached result" in (par / "compare" / name / "seed0" / "run.log").read_text()
    assert "Platform gpu (deterministic XLA ops); 2 runs at once" in (par / "compare.md").read_text()


def test_parallel_runs_are_refused_in_a_multi_process_job():
    from echorl_jax import main

    single = config_lib.build_config({"dist": {"initialize": "never"}}).dist
    multi = config_lib.build_config({"dist": {"initialize": "always"}}).dist
    assert main.compare_parallel(0, single) == 0 and main.compare_parallel(3, single) == 3
    assert main.compare_parallel(0, multi) == 1
    with pytest.raises(config_lib.ConfigError, match="--parallel 3"):
        main.compare_parallel(3, multi)


def test_methods_flag_names_presets_and_refuses_others():
    from echorl_jax import main

    assert main.compare_methods("grpo") == ("grpo",)
    assert main.compare_methods(" rloo, dapo ") == ("rloo", "dapo")
    for bad in ("", "grpo+echo", "grpo,ppo"):
        with pytest.raises(config_lib.ConfigError, match="--methods"):
            main.compare_methods(bad)
