"""bench/device_check.py (issue 19 item 6): its --help says what it measures, how long and where the
table goes; a part that fails or times out still gives its row; --quick on CPU runs every part that a
CPU can and writes a table with every row."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "device_check.py")
ROW_IDS = ["1", "2", "3a", "3b", "3c", "3d", "3e", "3f", "3g", "3h", "3i", "4", "5"]


def _module():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _table_rows(text: str) -> dict[str, list[str]]:
    """``{row id: cells}`` of the check's table (the first table in the text)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| #") and not line.startswith("| part"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            if cells[0] in ROW_IDS:
                out[cells[0]] = cells
    return out


def test_help_says_what_how_long_and_where():
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout  # fmt: skip
    for needle in ("transformers ``generate``", "long-tail", "torch.compile", "packed vs padded", "xla_chunked",
                   "remat", "peak_bytes_in_use", "learner_memory", "200,000 tok/s", "0.118 s/step",
                   "8 minutes", "470 s", "$OUT/device_check.md", "bench/README.md"):  # fmt: skip
        assert needle in out, needle
    wrapper = subprocess.run(["bash", os.path.join(REPO, "bench", "device_check.sh"), "--help"], capture_output=True,
                             text=True, check=True, cwd=REPO).stdout  # fmt: skip
    assert "~8 minutes" in wrapper and "$OUT/device_check.md" in wrapper and ".whl" in wrapper
    assert "usage: bench/device_check.py" in wrapper  # then the driver's own help


def test_failed_timed_out_and_skipped_parts_keep_their_rows(tmp_path):
    dc = _module()
    todo = dc.parts(quick=True)
    with open(tmp_path / "log", "w") as log:
        boom = dc.Part("sampler", ["-c", "import sys; print('step 1'); sys.exit('ValueError: bad shape 7')"], 1, "x")
        failed = dc.run_part(boom, str(tmp_path), time.monotonic() + 60, log)
        slow = dc.Part("longtail", ["-c", "import time; print('waiting', flush=True); time.sleep(30)"], 0.5, "x")
        t0 = time.monotonic()
        timed_out = dc.run_part(slow, str(tmp_path), time.monotonic() + 3, log)
        assert time.monotonic() - t0 < 20
        late = dc.run_part(dc.Part("plan", ["-c", "pass"], 100, "x"), str(tmp_path), time.monotonic() + 5, log)
    assert failed.error == "exit 1: ValueError: bad shape 7"
    assert timed_out.error.startswith("timed out after 3 s")
    assert late.skipped.startswith("time budget")
    outcomes = {p.key: dc.Outcome(skipped="not run") for p in todo}
    outcomes.update(sampler=failed, longtail=timed_out, plan=late)
    rows = _table_rows(dc.render(dc.rows(todo, outcomes, on_gpu=True), "header"))
    assert list(rows) == ROW_IDS
    assert rows["1"][-1] == "FAILED: exit 1: ValueError: bad shape 7"
    assert rows["2"][-1].startswith("FAILED: timed out after 3 s")
    assert rows["4"][-1].startswith("skipped: time budget")


def test_the_planner_s_accelerator_is_named_from_the_device_kind():
    dc = _module()
    kinds = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200", "NVIDIA A100-SXM4-80GB": "a100",
             "TPU v5 lite": "v5e", "TPU v5p": "v5p", "TPU v6 lite": "v6e", "cpu": None}  # fmt: skip
    assert {k: dc.accel_of(k) for k in kinds} == kinds


def test_targets_are_judged_from_the_results():
    dc = _module()
    todo = dc.parts(quick=False)
    ok = lambda data: dc.Outcome(data=data)  # noqa: E731
    outcomes = {p.key: dc.Outcome(skipped="not run") for p in todo}
    outcomes["sampler"] = ok({"ours": {"tokens_per_s": 150_000.0, "ms_per_step": 1.7},
                              "peer": {"tokens_per_s": 5_000.0}})  # fmt: skip
    outcomes["train_eager"] = ok({"backend": "gpu", "peer": {"s_per_step": 0.19, "name": "eager"},
                                  "ours": {"s_per_step": 0.1, "tflops": 300.0, "compile_s": 20.0, "attention": "cudnn",
                                           "device_memory": {"compiled": {"peak_bytes_in_use": 2**30},
                                                             "after_steps": {"peak_bytes_in_use": 20 * 2**30}}}})  # fmt: skip
    outcomes["train_compiled"] = ok({"peer": {"s_per_step": 0.105, "name": "compiled", "compile_s": 40.0}})
    outcomes["plan"] = ok({"predicted_peak_bytes": 22 * 2**30, "attention": "cudnn", "predicted_step_s": 0.025,
                           "accel": "h100"})  # fmt: skip
    outcomes["streaming"] = ok({"runs": {
        "sync (slot refill)": {"occupancy": 0.6, "decode_steps_per_1k_tokens": 100.0, "s_per_step": 2.0},
        "stream k=1": {"occupancy": 0.95, "decode_steps_per_1k_tokens": 66.0, "s_per_step": 1.6}}})  # fmt: skip
    rows = _table_rows(dc.render(dc.rows(todo, outcomes, on_gpu=True), "header"))
    assert rows["5"][-1] == "met" and rows["5"][4] == "1.25x sync/stream step time"
    assert rows["1"][4] == "30.00x ours/peer" and rows["1"][-1] == "missed"  # 150k < 200k tok/s
    assert rows["3a"][-1] == "met" and rows["3a"][4] == "1.90x peer/ours"
    assert rows["3b"][-1] == "missed"  # 0.1 s meets 0.118 s, but 1.05x < 1.1x the compiled peer
    assert rows["4"][4] == "1.10x predicted/measured" and "20.00 GiB" in rows["4"][3]
    assert "step >= 25.0 ms (roofline, h100 peaks) vs measured 100.0 ms: 25% of peak" in rows["4"][2]
    assert rows["3c"][-1] == "skipped: not run"


@pytest.mark.slow
def test_quick_run_on_cpu_writes_every_row(tmp_path):
    out = tmp_path / "device_check.md"
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", "--out", str(out)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout  # the same table on stdout
    rows = _table_rows(text)
    assert list(rows) == ROW_IDS
    for rid in ("1", "2", "3a", "3b", "3f", "3g"):  # what a CPU runs in --quick
        assert rows[rid][-1] in ("not judged (no GPU)", "ok") or rows[rid][-1].startswith("not judged"), rows[rid]
        assert rows[rid][2] != "-" and rows[rid][3] != "-" and rows[rid][4] != "-", rows[rid]
    for rid in ("3c", "3d"):
        assert rows[rid][-1] == "skipped: cuDNN attention needs a GPU"
    for rid in ("3e", "3h"):
        assert rows[rid][-1].startswith("skipped: --quick")
    assert rows["3i"][-1].startswith("skipped: Pallas splash")
    assert rows["4"][2].startswith("predicted ") and rows["4"][-1].startswith("n/a: the cpu backend")
    assert rows["5"][2].endswith("s/RL step") and rows["5"][-1].startswith("not judged"), rows["5"]
    results = json.loads((tmp_path / "device_check.json").read_text())
    # The planner compiled the very step 3a ran: its prediction is that program's bytes.
    xla = results["parts"]["train_eager"]["data"]["ours"]["memory_analysis"]
    own = xla["argument"] + xla["temp"] + xla["output"] - xla["alias"]
    assert results["parts"]["plan"]["data"]["predicted_peak_bytes"] == own
    assert results["parts"]["train_eager"]["data"]["ours"]["first"]["loss"] == pytest.approx(
        results["parts"]["train_eager"]["data"]["peer"]["first"]["loss"], abs=1e-6)  # both sides did the same work
    assert "===== sampler" in (tmp_path / "device_check.log").read_text()
