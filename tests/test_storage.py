"""Run files in a bucket (train.workdir=gs://...): metrics, config, report, TensorBoard and the run-state rules go
through etils.epath, here onto a local stand-in for GCS (tests/fake_gcs.py; nothing reaches the network)."""

from __future__ import annotations

import json
import os

import fake_gcs
import pytest

from echorl_jax import config as config_lib
from echorl_jax.trainer import report, run_state, storage
from echorl_jax.trainer.metrics_log import MetricsLog, read_jsonl

RUN = "gs://bucket/runs/a"


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
    fake_gcs.install(tmp_path / "gcs")
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would land here as ./gs:/...
    yield tmp_path / "gcs" / "bucket" / "runs" / "a"
    fake_gcs.uninstall()
    assert not os.path.exists(tmp_path / "gs:"), "a gs:// path was written as a local path"


def test_metrics_in_a_bucket_are_flushed_and_rewound_on_resume(bucket, monkeypatch):
    monkeypatch.setattr(storage, "REMOTE_FLUSH_S", 3600.0)
    log = MetricsLog(RUN, resume_step=None)
    for step in (1, 2, 3):
        log.write(step, {"loss": float(step)})
    assert read_jsonl(f"{RUN}/metrics.jsonl") == []  # buffered: no object rewrite per row
    log.flush()  # what the trainer does before each checkpoint
    assert [r["step"] for r in read_jsonl(f"{RUN}/metrics.jsonl")] == [1, 2, 3]
    log.write(4, {"loss": 4.0})
    log.close()
    assert [r["step"] for r in read_jsonl(f"{RUN}/metrics.jsonl")] == [1, 2, 3, 4]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(bucket / "tensorboard"))
    resumed = MetricsLog(RUN, resume_step=2)  # a restart from the checkpoint of step 2
    assert [r["step"] for r in read_jsonl(f"{RUN}/metrics.jsonl")] == [1, 2]
    assert resumed.has(2, "train") and not resumed.has(3, "train")
    resumed.close()


def test_run_state_and_report_in_a_bucket(bucket):
    cfg = config_lib.build_config({"train": {"workdir": RUN}})
    run_state.write_config(RUN, config_lib.to_dict(cfg))
    assert json.loads((bucket / "config.json").read_text())["train"]["workdir"] == RUN
    log = MetricsLog(RUN)
    log.write(0, {"avg@4": 0.5}, kind="eval")
    log.write(1, {"accuracy": 0.25, "entropy/mean": 1.0})
    log.close()
    path = report.write_report(cfg, {})
    assert path == f"{RUN}/report.md" and "held-out avg@4" in (bucket / "report.md").read_text()
    assert (bucket / "accuracy.png").is_file()
    assert run_state.existing_run_files(RUN) == ["accuracy.png", "config.json", "entropy.png", "metrics.jsonl",
                                                 "report.md", "tensorboard"]  # fmt: skip
    dest = run_state.move_previous_run(RUN, lambda _: None)  # train.resume=false: moved aside, nothing deleted
    assert dest.startswith(f"{RUN}/previous_runs/") and run_state.existing_run_files(RUN) == []
    assert (bucket / "previous_runs" / os.path.basename(dest) / "metrics.jsonl").is_file()


def test_local_dir_for_uploads_what_a_library_writes(bucket):
    with storage.local_dir_for(f"{RUN}/hf_export") as local:
        assert not storage.is_remote(local)
        os.makedirs(os.path.join(local, "sub"))
        open(os.path.join(local, "config.json"), "w").write("{}")
        open(os.path.join(local, "sub", "x.bin"), "wb").write(b"\0\1")
    assert (bucket / "hf_export" / "config.json").read_text() == "{}"
    assert (bucket / "hf_export" / "sub" / "x.bin").read_bytes() == b"\0\1"
    with storage.local_dir_for("/tmp/somewhere") as local:
        assert local == "/tmp/somewhere"  # a local path is used as it is
