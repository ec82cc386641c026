"""Multi-process runs: the trainer as 2 processes x 4 CPU devices (jax.distributed on localhost, JAX's gloo
CPU collectives) against 1 process x 8 devices, plus the pieces that make it work."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from echorl_jax import cli, main as main_lib
from echorl_jax.config import ConfigError, DistConfig
from echorl_jax.data.pipeline import DataError, PromptPipeline
from tests.multiproc import assert_export_close, assert_rows_close, metric_rows
from tests.test_data import make_records, make_tokenizer
from tests.xla_flags import with_fast_compile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- per-host data


def test_host_batches_concatenate_to_the_one_host_batch():
    """Hosts take blocks of one global stream: process-order concatenation == the 1-host batch of H*N."""
    tok, recs = make_tokenizer(), make_records(20)
    kw = dict(max_prompt_len=48, seed=3)
    for mode, n_batches in (("train", 7), ("eval", 2)):
        one = PromptPipeline(recs, tok, batch_size=6, mode=mode, shard_index=0, shard_count=1, **kw)
        hosts = [PromptPipeline(recs, tok, batch_size=2, mode=mode, shard_index=h, shard_count=3, **kw)
                 for h in range(3)]
        for _ in range(n_batches):  # train crosses epoch boundaries (20 prompts, 6 per batch)
            want = next(one)
            got = [next(h) for h in hosts]
            np.testing.assert_array_equal(np.concatenate([b.record_index for b in got]), want.record_index)
            np.testing.assert_array_equal(np.concatenate([b.tokens_np for b in got]), want.tokens_np)
            assert sum((b.ground_truth for b in got), []) == want.ground_truth


def test_a_data_state_saved_on_two_hosts_continues_on_one_or_three():
    """Elastic resume: the state is a position in the global stream, so 2 hosts x 3 prompts saved after two
    batches continue as 1 host x 6 or 3 hosts x 2 with exactly the batches the 2 hosts would have drawn."""
    tok, recs = make_tokenizer(), make_records(20)
    kw = dict(max_prompt_len=48, seed=3, mode="train")
    two = [PromptPipeline(recs, tok, batch_size=3, shard_index=h, shard_count=2, **kw) for h in range(2)]
    for _ in range(2):
        [next(p) for p in two]
    state = two[1].get_state()  # any host's state
    want = [np.concatenate([next(p).record_index for p in two]) for _ in range(4)]  # crosses an epoch
    for hosts in (1, 3):
        resumed = [PromptPipeline(recs, tok, batch_size=6 // hosts, shard_index=h, shard_count=hosts, **kw)
                   for h in range(hosts)]  # fmt: skip
        for p in resumed:
            p.set_state(state)
        got = [np.concatenate([next(p).record_index for p in resumed]) for _ in range(4)]
        np.testing.assert_array_equal(got, want)
    other = PromptPipeline(recs, tok, batch_size=4, shard_index=0, shard_count=1, **kw)  # another global batch
    with pytest.raises(DataError, match="global_batch"):
        other.set_state(state)
    legacy = {"grain": state["grain"], "config": {**{k: v for k, v in state["config"].items() if k != "global_batch"},
                                                  "batch_size": 3, "shard_count": 2}}  # fmt: skip
    one = PromptPipeline(recs, tok, batch_size=6, shard_index=0, shard_count=1, **kw)
    one.set_state(legacy)  # a state saved before it was host-independent
    np.testing.assert_array_equal(next(one).record_index, want[0])


# ----------------------------------------------------------------------------- distributed init


def test_distributed_args():
    args = cli.distributed_args
    assert args(DistConfig(), {}) is None  # a plain single-process run (no TPU on this machine)
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert args(DistConfig(), env) == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3}
    cfg = DistConfig(coordinator="h:1", num_processes=2, process_id=0)
    assert args(cfg, env) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}  # config wins
    assert args(DistConfig(initialize="never"), env) is None
    assert args(DistConfig(initialize="always"), {}) == {}  # JAX's own cluster detection
    assert args(DistConfig(), {"SLURM_JOB_ID": "7"}) == {}
    with pytest.raises(ConfigError, match=r"incomplete.*dist.num_processes \(JAX_NUM_PROCESSES\), dist.process_id"):
        args(DistConfig(coordinator="h:1"), {})


# ----------------------------------------------------------------------------- the trainer, 2 x 4 vs 1 x 8

# A reward that random-weight outputs earn on some rows, which depends on the row's ground truth: rewards
# verified on the wrong host or assigned to the wrong rows change every metric below.
REWARD = '''
def reward(response, ground_truth, *, data_source, extra_info, prompt):
    r = (len(response) + sum(map(ord, ground_truth))) % 3 / 2
    return r, r > 0.6
'''

# Each process records what it creates or opens for writing in the workdir, outside the checkpoints.
WORKER = '''
import atexit, json, os, sys
workdir, record = os.path.realpath(sys.argv[1]), sys.argv[2]
writes = []
def hook(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
    else:
        writing = event in ("os.mkdir", "os.rename", "os.replace", "os.remove")
    if writing and not isinstance(args[0], int):
        path = os.path.realpath(os.fsdecode(args[0]))
        if path.startswith(workdir + os.sep) and not path.startswith(os.path.join(workdir, "checkpoints")):
            writes.append(os.path.relpath(path, workdir))
sys.addaudithook(hook)
atexit.register(lambda: open(record, "w").write(json.dumps(sorted(set(writes)))))
if os.environ.get("SIGTERM_AFTER_FIRST_ROLLOUT") == "1":  # a preemption notice that reaches this host only
    import signal
    from echorl_jax.trainer import rollout
    collect = rollout.collect
    def collect_then_sigterm(*args, **kwargs):
        out = collect(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return out
    rollout.collect = collect_then_sigterm
from echorl_jax import main
sys.exit(main.main(sys.argv[3:]))
'''


def _args(workdir, reward_path, steps):
    return ["--config", os.path.join(ROOT, "configs", "tiny_test.py"),
            f"--config.train.workdir={workdir}", f"--config.train.steps={steps}", "--config.sft.steps=0",
            "--config.sampling.max_new_tokens=12", "--config.reward.name=custom",
            f"--config.reward.custom={reward_path}:reward"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_processes(tmp_path, workdir, reward_path, steps, tag, n=2, sigterm_process=None):
    """The trainer as ``n`` processes x 4 CPU devices; returns each process's written files and log.
    ``sigterm_process`` gets a SIGTERM during step 1."""
    port = _free_port()
    procs, logs, records = [], [], []
    for i in range(n):
        env = dict(os.environ, JAX_PLATFORMS="cpu",  # compiled as in the test process (tests/xla_flags.py)
                   XLA_FLAGS=with_fast_compile("--xla_force_host_platform_device_count=4"),
                   JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i),
                   JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                   SIGTERM_AFTER_FIRST_ROLLOUT=str(int(i == sigterm_process)))  # fmt: skip
        logs.append(tmp_path / f"{tag}_p{i}.log")
        records.append(tmp_path / f"{tag}_p{i}_writes.json")
        cmd = [sys.executable, "-c", WORKER, str(workdir), str(records[-1]), *_args(workdir, reward_path, steps)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [0] * n, "\n\n".join(t[-3000:] for t in texts)
    return [json.loads(r.read_text()) for r in records], texts


@pytest.mark.slow  # ~1-3 min: three trainer processes; CI runs it (.ci/run)
def test_two_processes_match_one_process_with_resume(tmp_path):
    reward_path = tmp_path / "my_reward.py"
    reward_path.write_text(REWARD)
    # Reference: one process x 8 devices (this pytest process), 2 steps straight.
    one = tmp_path / "one"
    assert main_lib.main(_args(one, reward_path, 2)) == 0

    # 2 processes x 4 devices: process 1 alone gets SIGTERM during step 1; both save step 1 and exit
    # cleanly. The restarted job resumes at step 2.
    two = tmp_path / "two"
    writes, logs = _run_processes(tmp_path, two, reward_path, 2, "first", sigterm_process=1)
    assert "SIGTERM: saved step 1, exiting" in logs[0]
    assert os.listdir(two / "checkpoints") == ["1"]
    writes2, logs2 = _run_processes(tmp_path, two, reward_path, 2, "resume")
    assert "resumed from step 1" in logs2[0]

    rows_one, rows_two = metric_rows(one), metric_rows(two)
    assert [r["kind"] for r in rows_one] == ["eval", "train", "train", "eval"]
    assert 0 < rows_one[1]["reward/mean"] < 1 and rows_one[1]["grad_norm"] > 0  # a real learning signal
    assert_rows_close(rows_two, rows_one)
    assert rows_two[2]["reward/mean"] == rows_one[2]["reward/mean"]  # the resumed step drew the same rollouts
    assert rows_one[2]["reward/mean"] != rows_one[1]["reward/mean"]  # ... which differ from step 1's

    assert_export_close(one, two)

    # Only process 0 writes run files (metrics, TensorBoard, report, plots, config, HF export, tokenizer).
    assert {"metrics.jsonl", "config.json", "tokenizer"} <= set(writes[0]), writes[0]
    assert {"metrics.jsonl", "report.md"} <= set(writes2[0]), writes2[0]
    assert "hf_export/model.safetensors.tmp" in writes2[0] and any(p.startswith("tensorboard") for p in writes2[0])
    assert writes[1] == [] and writes2[1] == [], (writes[1], writes2[1])
    assert "report:" not in logs[1] and "report:" not in logs2[1]
