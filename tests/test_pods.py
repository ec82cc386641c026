"""Every feature as 2 processes x 4 CPU devices against 1 process on the same global batch (jax.distributed on
localhost): LUFFY, the SFT warm start, DAPO's dynamic sampling, evaluate, analyze_steps, --compare; and a
checkpoint saved on 2 x 4 resumed on 1 x 8 and 1 x 2 (elastic resume)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from byo_fixture import make_byo_dir
from multiproc import ROOT, run_tool

from echorl_jax.data import prep
from echorl_jax.evaluation import benchmark

TINY = os.path.join(ROOT, "configs", "tiny_test.py")


# ----------------------------------------------------------------------------- evaluate --responses


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pods_eval")
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), d / "raw.parquet")
    data = str(prep.write_parquet(prep.convert("aime24", [d / "raw.parquet"]), d / "aime24.parquet"))
    return make_byo_dir(d / "byo", generation_eos=0), data


def _evaluate_argv(model, data, out, k=2):
    return ["--model", model, "--data", data, "--k", str(k), "--max-new-tokens", "6", "--out", str(out / "r.json"),
            "--responses", str(out / "r.jsonl"), "--config.data.max_prompt_len=320"]  # fmt: skip


def _jsonl(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


@pytest.mark.slow  # two evaluate processes (~1 min on 2 cores); CI runs it
def test_evaluate_responses_keep_every_host_s_records(tmp_path, eval_files):
    """The issue's reproducer: 2 processes x 1 device vs 1 x 2, 6 records, k = 2 -> 12 response lines
    (before the fix: 8, the other host's records written with empty slices)."""
    model, data = eval_files
    (tmp_path / "one").mkdir()
    assert benchmark.main(_evaluate_argv(model, data, tmp_path / "one") + ["--config.mesh.num_devices=2"]) == 0
    (tmp_path / "two").mkdir()
    run_tool(tmp_path, "eval", ["evaluate", *_evaluate_argv(model, data, tmp_path / "two")], processes=2, devices=1)
    one, two = _jsonl(tmp_path / "one" / "r.jsonl"), _jsonl(tmp_path / "two" / "r.jsonl")
    assert len(one) == 12 and sorted({x["index"] for x in one}) == list(range(6))
    assert two == one  # same responses and verdicts, every record
    r1, r2 = (json.loads((tmp_path / d / "r.json").read_text()) for d in ("one", "two"))
    assert r2["verdicts"] == r1["verdicts"] and r2["metrics"] == r1["metrics"]
