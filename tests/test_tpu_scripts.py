"""tpu_scripts/: every script's --dry-run prints the exact gcloud commands; missing settings and a missing
gcloud fail early with the documented message (no gcloud call is ever made here)."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tpu_scripts")
SLICE = ["--name", "pod1", "--zone", "us-central2-b"]
BASH = shutil.which("bash")
BARE_PATH = ""
SSH = "gcloud compute tpus tpu-vm ssh pod1 --zone=us-central2-b"


@pytest.fixture(scope="module", autouse=True)
def bare_path(tmp_path_factory):
    """Every script here runs with a PATH that has the few tools the scripts use and no gcloud, so no
    test can reach Google Cloud whatever a script does."""
    global BARE_PATH
    bin_dir = tmp_path_factory.mktemp("bin")
    for tool in ("dirname", "basename", "cat", "git", "mkdir"):
        os.symlink(shutil.which(tool), bin_dir / tool)
    BARE_PATH = str(bin_dir)
    return BARE_PATH


def run(script, *args, env=None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "ECHORL_"))}
    clean.update(env or {}, PATH=BARE_PATH)
    return subprocess.run([BASH, os.path.join(SCRIPTS, script), *args], capture_output=True, text=True,
                          env=clean, timeout=30)  # fmt: skip


def dry(script, *args, env=None) -> list[str]:
    out = run(script, "--dry-run", *args, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_create_modes():
    base = "--zone=us-central2-b --accelerator-type=v4-32"
    assert dry("create.sh", *SLICE, "--type", "v4-32") == [
        f"gcloud compute tpus tpu-vm create pod1 {base} --version=tpu-ubuntu2204-base"]
    assert dry("create.sh", *SLICE, "--type=v4-32", "--mode=spot", "--runtime", "my-rt") == [
        f"gcloud compute tpus tpu-vm create pod1 {base} --version=my-rt --spot"]
    assert dry("create.sh", *SLICE, "--type", "v5litepod-16", "--mode", "queued-spot", "--project", "proj") == [
        "gcloud compute tpus queued-resources create pod1 --zone=us-central2-b --project=proj --node-id=pod1 "
        "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot"]
    # settings from the environment, as documented
    env = {"TPU_NAME": "pod1", "TPU_ZONE": "us-central2-b", "TPU_TYPE": "v6e-8", "TPU_MODE": "queued"}
    assert dry("create.sh", env=env) == [
        "gcloud compute tpus queued-resources create pod1 --zone=us-central2-b --node-id=pod1 "
        "--accelerator-type=v6e-8 --runtime-version=v2-alpha-tpuv6e"]


def test_setup_copies_or_clones_then_installs_the_tpu_extra():
    lines = dry("setup.sh", *SLICE)
    assert lines[0] == f"git -C {ROOT} archive --format=tar.gz -o /tmp/echorl-jax-src.tar.gz HEAD"
    assert lines[1] == ("gcloud compute tpus tpu-vm scp /tmp/echorl-jax-src.tar.gz pod1:/tmp/echorl-jax-src.tar.gz "
                        "--zone=us-central2-b --worker=all")
    assert lines[2] == (f"{SSH} --worker=all '--command=mkdir -p ~/echorl-jax && "
                        "tar -xzf /tmp/echorl-jax-src.tar.gz -C ~/echorl-jax'")
    assert lines[3].startswith(f"{SSH} --worker=all '--command=cd ~/echorl-jax && python3 -m pip install")
    assert "pip install -q -e '\\''.[tpu]'\\''" in lines[3]
    cloned = dry("setup.sh", *SLICE, "--repo", "https://github.com/me/echorl-jax", "--ref", "v1")
    assert "git clone https://github.com/me/echorl-jax ~/echorl-jax" in cloned[0] and "checkout v1" in cloned[0]
    assert cloned[1:] == lines[3:]


def test_run_is_detached_with_a_log_per_worker():
    (line,) = dry("run.sh", *SLICE, "--config", "configs/default.py", "--",
                  "--config.train.steps=5", "--config.train.checkpoint_dir=gs://b/run/ckpt")
    assert line == (
        f"{SSH} --worker=all '--command=cd ~/echorl-jax && mkdir -p logs && setsid nohup python3 -m "
        "echorl_jax.main --config configs/default.py --config.train.steps=5 "
        "--config.train.checkpoint_dir=gs://b/run/ckpt > logs/default-$(hostname).log 2>&1 < /dev/null & "
        "echo $! > logs/default-$(hostname).pid; echo started default on $(hostname)'")


def test_logs_stop_delete():
    assert dry("logs.sh", *SLICE, "--run", "r1") == [
        f"{SSH} --worker=0 '--command=tail -n 100 -f ~/echorl-jax/logs/r1-*.log'"]
    assert dry("logs.sh", *SLICE, "--run", "r1", "--fetch", "out", "--workdir", "runs/r1") == [
        "mkdir -p out",
        "gcloud compute tpus tpu-vm scp 'pod1:~/echorl-jax/logs/r1-*.log' out/ --zone=us-central2-b --worker=all",
        "gcloud compute tpus tpu-vm scp --recurse pod1:~/echorl-jax/runs/r1 out/ --zone=us-central2-b --worker=0"]
    assert dry("stop.sh", *SLICE, "--run", "r1") == [
        f"{SSH} --worker=all '--command=kill -TERM $(cat ~/echorl-jax/logs/r1-$(hostname).pid) && "
        "echo sent SIGTERM on $(hostname) || echo no running r1 on $(hostname)'"]
    assert dry("delete.sh", *SLICE) == ["gcloud compute tpus tpu-vm delete pod1 --zone=us-central2-b --quiet"]
    assert dry("delete.sh", *SLICE, "--queued") == [
        "gcloud compute tpus queued-resources delete pod1 --zone=us-central2-b --force --quiet"]


@pytest.mark.parametrize("script,args,message", [
    ("create.sh", ["--zone", "z", "--type", "v4-8"], "--name is not set: pass --name or set TPU_NAME"),
    ("create.sh", ["--name", "n", "--type", "v4-8"], "--zone is not set: pass --zone or set TPU_ZONE"),
    ("create.sh", ["--name", "n", "--zone", "z"], "--type is not set: pass --type or set TPU_TYPE"),
    ("create.sh", ["--name", "n", "--zone", "z", "--type", "v9-8"], "--runtime is not set and there is no default for --type v9-8"),
    ("create.sh", ["--name", "n", "--zone", "z", "--type", "v4-8", "--mode", "cheap"], "--mode (or TPU_MODE) is 'cheap'"),
    ("run.sh", ["--name", "n", "--zone", "z"], "--config is not set: pass --config or set ECHORL_CONFIG"),
    ("logs.sh", ["--name", "n", "--zone", "z"], "--run is not set: pass --run or set ECHORL_RUN"),
    ("stop.sh", ["--name", "n", "--zone", "z"], "--run is not set"),
    ("setup.sh", ["--zone", "z"], "--name is not set"),
    ("delete.sh", ["--name", "n", "--zone"], "--zone needs a value"),
    ("run.sh", ["--name", "n", "--zone", "z", "--bogus"], "unknown option '--bogus'"),
])  # fmt: skip
def test_missing_or_bad_settings(script, args, message):
    out = run(script, "--dry-run", *args)
    assert out.returncode == 2 and out.stdout == ""
    assert f"{script}: error: {message}" in out.stderr


def test_missing_gcloud_fails_early_unless_dry_run():
    for script, extra in [("create.sh", ["--type", "v4-8"]), ("setup.sh", []), ("run.sh", ["--config", "c.py"]),
                          ("logs.sh", ["--run", "r"]), ("stop.sh", ["--run", "r"]), ("delete.sh", [])]:
        out = run(script, *SLICE, *extra)
        assert out.returncode == 2 and out.stdout == "", script
        assert f"{script}: error: gcloud not found: install the Google Cloud CLI" in out.stderr, script
        assert dry(script, *SLICE, *extra), script  # --dry-run needs no gcloud


def test_help():
    for script in ("create.sh", "setup.sh", "run.sh", "logs.sh", "stop.sh", "delete.sh"):
        out = run(script, "--help")
        assert out.returncode == 0 and out.stdout.startswith(f"usage: {script}") and "--dry-run" in out.stdout
