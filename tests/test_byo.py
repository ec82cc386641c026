"""Bring your own model and dataset, end to end: configs/byo_example.py on a tiny Qwen2-style checkpoint with a
ChatML tokenizer, verl parquet files with chat-message prompts, and a custom reward beside math-verify."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from byo_fixture import IM_END, make_byo_dir
from tokenizers import Tokenizer

from echorl_jax.trainer.metrics_log import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "configs", "byo_example.py")

HOOK = '''
import json, os

def score(response, ground_truth, *, data_source, extra_info, prompt):
    with open(os.environ["BYO_HOOK_LOG"], "a") as f:
        f.write(json.dumps({"data_source": data_source, "extra_info": extra_info, "prompt": prompt}) + "\\n")
    return float(len(response) % 2), len(response) % 2 == 1
'''


def write_verl_parquet(path, source, n, *, system=False):
    rows = []
    for i in range(n):
        messages = [{"role": "user", "content": f"What is {i} + {i}?"}]
        if system:
            messages.insert(0, {"role": "system", "content": "Reason step by step."})
        rows.append({"prompt": messages, "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
                     "data_source": source, "extra_info": {"index": i, "split": source}})  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.slow  # a long end-to-end run: CI runs it (python -m pytest -q -m slow)
def test_byo_example_config_runs_on_a_tiny_chat_model(tmp_path):
    model = make_byo_dir(tmp_path / "model", generation_eos=[0, 7])
    math_train, mine_train, test = (str(tmp_path / n) for n in ("math.parquet", "my_task.parquet", "test.parquet"))
    write_verl_parquet(math_train, "math_dapo", 8, system=True)
    write_verl_parquet(mine_train, "my_task_a", 8)
    write_verl_parquet(test, "math_test", 4)
    hook = tmp_path / "my_rewards.py"
    hook.write_text(HOOK)
    workdir = tmp_path / "run"
    overrides = {
        "model.path": model, "model.param_dtype": "float32", "model.compute_dtype": "float32", "model.remat": "none",
        "data.train": f"{math_train},{mine_train}", "data.eval": test, "data.max_prompt_len": 64,
        "reward.custom": f"{hook}:score", "sampling.max_new_tokens": 12,
        "rl.prompts_per_step": 4, "rl.group_size": 4, "rl.micro_batches": 2,
        "train.steps": 1, "train.eval_samples": 2, "train.workdir": workdir, "train.progress": False,
    }  # fmt: skip
    cmd = [sys.executable, "-m", "echorl_jax.main", "--config", EXAMPLE, *(f"--config.{k}={v}" for k, v in overrides.items())]
    env = dict(os.environ, BYO_HOOK_LOG=str(tmp_path / "hook.jsonl"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Stops: the tokenizer's eos, generation_config's ids and the chat template's end of turn, logged.
    stop_line = next(line for line in proc.stdout.splitlines() if "stop ids:" in line)
    assert IM_END in stop_line and "step delimiters:" in proc.stdout

    # The custom hook saw the rows of its data_source with their extra_info and the chat messages;
    # math_dapo rows went to math-verify.
    calls = [json.loads(line) for line in open(tmp_path / "hook.jsonl")]
    assert calls and all(c["data_source"] == "my_task_a" for c in calls)
    assert all(c["extra_info"]["split"] == "my_task_a" and c["prompt"][0]["role"] == "user" for c in calls)

    # Held-out metrics come from the user's eval file, not the built-in task.
    evals = [r for r in read_jsonl(workdir / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1]
    assert all(r["count/source=math_test"] == 4 and not any("arith" in k for k in r) for r in evals)

    # The export stops where the run stopped and keeps the checkpoint's own tokenizer.
    export = workdir / "hf_export"
    gen = json.load(open(export / "generation_config.json"))
    im_end = Tokenizer.from_file(os.path.join(model, "tokenizer.json")).token_to_id(IM_END)
    assert {0, 7, im_end} <= set(gen["eos_token_id"])
    text = "<|im_start|>user\n 1234 the answer<|im_end|>\n"
    original = Tokenizer.from_file(os.path.join(model, "tokenizer.json")).encode(text).ids
    assert Tokenizer.from_file(str(export / "tokenizer.json")).encode(text).ids == original
