"""Every feature as 2 processes x 4 CPU devices against 1 process on the same global batch (jax.distributed on
localhost): LUFFY after the SFT warm start, DAPO's dynamic sampling, evaluate, analyze_steps, --compare; and a
checkpoint saved on 2 x 4 resumed on 1 x 8 and 1 x 2 (elastic resume)."""

from __future__ import annotations

import json
import os
import shutil

import fake_gcs
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from byo_fixture import make_byo_dir
from multiproc import ROOT, assert_export_close, assert_rows_close, assert_value_close, metric_rows, run_tool

from echorl_jax import cli, main as main_lib
from echorl_jax.data import prep
from echorl_jax.evaluation import benchmark

TINY = os.path.join(ROOT, "configs", "tiny_test.py")

# A reward that random-weight outputs earn on some rows, which depends on the row's ground truth: rewards
# verified on the wrong host or given to the wrong rows change every metric. With DAPO, half the prompts
# (by ground truth) get 0 on every rollout: zero-variance groups, dropped and refilled from more prompts.
REWARD = """
def reward(response, ground_truth, *, data_source, extra_info, prompt):
    if DROP_HALF and sum(map(ord, ground_truth)) % 2:
        return 0.0, False
    r = (len(response) + sum(map(ord, ground_truth))) % 3 / 2
    return r, r > 0.6
"""


def _reward_file(tmp_path, drop_half=False):
    path = tmp_path / f"reward_{int(drop_half)}.py"
    path.write_text(f"DROP_HALF = {drop_half}\n" + REWARD)
    return f"{path}:reward"


def _train_args(workdir, reward, steps=2, **overrides):
    args = {"train.workdir": workdir, "train.steps": steps, "sft.steps": 0, "sampling.max_new_tokens": 12,
            "reward.name": "custom", "reward.custom": reward, **overrides}  # fmt: skip
    return ["--config", TINY, *(f"--config.{k}={v}" for k, v in args.items())]


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


# ----------------------------------------------------------------------------- the feature matrix


def _expert_parquet(d):
    rows = [{"prompt": [{"role": "user", "content": f"Problem {i}?"}],
             "target": [{"role": "assistant", "content": t}], "reward_model": {"ground_truth": "46"}}
            for i, t in enumerate(["Step one: 12 + 34\nso 46\n\nThe answer is 46.", "Compute 123 - 7 = 116\nStep by step.\n",
                                   "the answer\n 1 12 123", "What is 12 + 34?\nThe answer is 46.", "1\n2\n3\n4",
                                   "12 + 34 = 46\n"])]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), d / "raw_expert.parquet")
    return str(prep.write_parquet(prep.convert("openr1_math_46k", [d / "raw_expert.parquet"]), d / "expert.parquet"))


def _case(name, tmp_path, eval_files):
    """``(tool argv for an output directory, how to compare two output directories)`` of a feature."""
    model, data = eval_files
    if name in ("luffy_after_warm_start", "dapo"):
        # LUFFY (the task's worked solutions as expert rows) after tiny_test's own warm start (20 SFT steps)
        extra = {"luffy_after_warm_start": {"objective.method": "luffy", "sampling.max_new_tokens": 28, "sft.steps": 20},
                 "dapo": {"objective.method": "dapo", "rl.max_sample_rounds": 3}}[name]  # fmt: skip
        reward = _reward_file(tmp_path, drop_half=name == "dapo")

        def compare(one, two):
            rows_one, rows_two = metric_rows(one), metric_rows(two)
            assert_rows_close(rows_two, rows_one)
            # 20 warm-start steps at lr 3e-3 amplify float32 summation-order differences in a few weights
            assert_export_close(one, two, atol=5e-5 if name == "luffy_after_warm_start" else 1e-5)
            train_rows = [r for r in rows_one if r["kind"] == "train"]
            if name == "luffy_after_warm_start":
                assert all("expert/accuracy" in r and r["offpolicy_prob"] > 0 for r in train_rows)
            if name == "dapo":  # the refill path ran: more prompt batches drawn, the same on both layouts
                assert max(r["sample_rounds"] for r in train_rows) > 1, train_rows

        return (lambda out: ["main", *_train_args(out, reward, **extra)]), compare
    if name == "compare":
        reward = _reward_file(tmp_path)

        def compare(one, two):
            a, b = (json.loads((d / "compare.json").read_text()) for d in (one, two))
            for variant in ("grpo", "grpo+echo"):
                ea, eb = a["runs"][variant]["0"]["eval"], b["runs"][variant]["0"]["eval"]
                assert ea.keys() == eb.keys() and ea["avg@2"] == eb["avg@2"]
                for k in (k for k in ea if not k.startswith("time/")):  # wall times differ by nature
                    assert_value_close(eb[k], ea[k], where=(variant, k))
            for variant in ("grpo", "grpo+echo"):
                assert_rows_close(metric_rows(two / "compare" / variant / "seed0"),
                                   metric_rows(one / "compare" / variant / "seed0"))  # fmt: skip

        return (lambda out: ["main", "--compare", "--seeds", "0", "--methods", "grpo",
                             *_train_args(out, reward, steps=1)]), compare  # fmt: skip
    if name == "evaluate":  # 6 records x k = 2: 12 response lines (a bug once wrote the other host's empty)
        def compare(one, two):
            assert _jsonl(two / "r.jsonl") == _jsonl(one / "r.jsonl") and len(_jsonl(one / "r.jsonl")) == 12
            r1, r2 = (json.loads((d / "r.json").read_text()) for d in (one, two))
            assert r2["verdicts"] == r1["verdicts"] and r2["metrics"] == r1["metrics"]

        return (lambda out: ["evaluate", *_evaluate_argv(model, data, out)]), compare
    if name == "analyze_steps":
        experts = _expert_parquet(tmp_path)

        def compare(one, two):
            a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
            assert len(a["solutions"]) == len(b["solutions"]) == 6
            for x, y in zip(a["solutions"], b["solutions"]):
                assert x.keys() == y.keys() and x["step_end"] == y["step_end"] and x["argmax_step"] == y["argmax_step"]
                np.testing.assert_allclose(y["step_entropy"], x["step_entropy"], rtol=1e-5, atol=1e-6)

        return (lambda out: ["analyze_steps", "--model", model, "--data", experts, "--out", str(out),
                             "--batch", "3"]), compare  # fmt: skip
    raise AssertionError(name)


FEATURES = ["luffy_after_warm_start", "dapo", "evaluate", "analyze_steps", "compare"]


@pytest.mark.slow  # each case: one process x 8 devices here, then 2 processes x 4 devices (~1-4 min); CI runs them
@pytest.mark.parametrize("feature", FEATURES)
def test_feature_on_two_processes_matches_one_process(tmp_path, eval_files, feature):
    """The same global batch on 2 x 4 as on 1 x 8 CPU devices gives the same numbers (to float32 summation
    order) for every feature: rewards verified on the right host, the same prompts and refill draws."""
    argv, compare = _case(feature, tmp_path, eval_files)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    assert cli.dispatch(argv(one)) == 0
    run_tool(tmp_path, feature, argv(two), processes=2, devices=4)
    compare(one, two)


# ----------------------------------------------------------------------------- elastic resume


@pytest.mark.slow  # a 2-process run and three in-process runs (~3-5 min); CI runs it
def test_a_checkpoint_from_two_processes_resumes_on_one_times_eight_and_one_times_two(tmp_path, capsys):
    """Saved on 2 processes x 4 devices, with the run's files in a bucket (local stand-in) and the checkpoints
    elsewhere; resumed as 1 x 8 and as 1 x 2 (another slice size): the next step's metrics and the final
    parameters equal a straight 1 x 8 run's, and the data stream goes on where it stopped."""
    reward = _reward_file(tmp_path)
    gcs = tmp_path / "gcs"
    saved_ckpt = tmp_path / "ckpt_saved"
    bucket_run = "gs://bucket/run"
    first = _train_args(bucket_run, reward, steps=1, **{"train.checkpoint_dir": saved_ckpt})
    out = run_tool(tmp_path, "saved", ["main", *first], processes=2, devices=4,
                   env={"FAKE_GCS_ROOT": str(gcs)}, prelude=fake_gcs.PRELUDE)  # fmt: skip
    assert "resumed" not in out.logs[0]
    saved_files = sorted(os.listdir(gcs / "bucket" / "run"))
    assert {"config.json", "metrics.jsonl", "hf_export", "tensorboard", "report.md", "tokenizer"} <= set(saved_files)
    assert not os.path.exists(os.path.join(ROOT, "gs:")), "a gs:// path was written as a local path"

    straight = tmp_path / "straight"
    assert main_lib.main(_train_args(straight, reward, steps=2)) == 0
    want = metric_rows(straight)

    fake_gcs.install(tmp_path / "gcs_copies")
    try:
        for name, devices in (("one_by_eight", 0), ("one_by_two", 2)):
            shutil.copytree(gcs / "bucket" / "run", tmp_path / "gcs_copies" / name / "run")
            ckpt = tmp_path / f"ckpt_{name}"
            shutil.copytree(saved_ckpt, ckpt)
            args = _train_args(f"gs://{name}/run", reward, steps=2, **{"train.checkpoint_dir": ckpt,
                                                                       "mesh.num_devices": devices})  # fmt: skip
            assert main_lib.main(args) == 0
            resumed = tmp_path / "gcs_copies" / name / "run"
            assert "resumed from step 1" in capsys.readouterr().out
            got = metric_rows(resumed)
            # the rows the 2 x 4 run wrote (with its final evaluation at step 1), then the resumed step and the
            # final evaluation
            assert [(r["kind"], r["step"]) for r in got][:3] == [("eval", 0), ("train", 1), ("eval", 1)]
            got = [r for r in got if (r["kind"], r["step"]) != ("eval", 1)]
            if devices == 0:
                assert_rows_close(got, want)
            else:  # 2 devices: other per-device batches, so other float32 summation orders; the held-out
                # evaluation samples at temperature 0.6, where such a difference can flip a token: train rows only
                rel = 2e-4
                assert_rows_close([r for r in got if r["kind"] == "train"], [r for r in want if r["kind"] == "train"],
                                   rel=rel, abs=2e-5)  # fmt: skip
            assert got[2]["reward/mean"] == want[2]["reward/mean"]  # the same rollouts: the data went on
            assert_export_close(straight, resumed, rtol=1e-5 if devices == 0 else 2e-4, atol=2e-5)
    finally:
        fake_gcs.uninstall()
