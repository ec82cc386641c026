"""evaluate CLI on a tiny BYO model: per-benchmark avg@k / pass@k, the paper table, JSON, checkpoint restore."""

import json

import jax
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from byo_fixture import make_byo_dir
from flax import nnx

from echorl_jax import config as config_lib
from echorl_jax.data import prep
from echorl_jax.data.formats import load_files
from echorl_jax.evaluation import benchmark, paper_table
from echorl_jax.models.hf import load_model
from echorl_jax.trainer import grading
from echorl_jax.trainer.checkpoint import Checkpointer
from echorl_jax.trainer.setup import build_setup

MAX_PROMPT = 320


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalsets")
    math_rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(5)]
    arc_rows = [{"question": f"Pick {c}.", "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]},
                 "answerKey": c} for c in "ABC"]  # fmt: skip
    out = []
    for name, rows in (("aime24", math_rows), ("arc_c", arc_rows)):
        src = d / f"raw_{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), src)
        out.append(str(prep.write_parquet(prep.convert(name, [src]), d / f"{name}.parquet")))
    return out


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    return make_byo_dir(tmp_path_factory.mktemp("byo"), generation_eos=0), make_byo_dir(
        tmp_path_factory.mktemp("byo1"), generation_eos=0, seed=1)


def run(tmp_path, name, files, *source, k=2):
    out = tmp_path / f"{name}.json"
    argv = [*source, "--data", ",".join(files), "--k", str(k), "--max-new-tokens", "6", "--out", str(out),
            "--responses", str(tmp_path / f"{name}.jsonl"), f"--config.data.max_prompt_len={MAX_PROMPT}"]
    assert benchmark.main(argv) == 0
    lines = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    return json.loads(out.read_text()), (tmp_path / f"{name}.md").read_text(), lines


def test_model_eval_table_and_json_equal_summarize(tmp_path, files, byo, capsys):
    result, table, lines = run(tmp_path, "m", files, "--model", byo[0], k=2)
    records = load_files(files)
    verdicts = {int(i): v for i, v in result["verdicts"].items()}
    assert sorted(verdicts) == list(range(len(records))) and all(len(v) == 2 for v in verdicts.values())
    assert result["metrics"] == grading.summarize(verdicts, records, 2)
    assert set(result["benchmarks"]) == {"aime24", "arc_c"}
    assert result["benchmarks"]["aime24"]["count"] == 5 and result["benchmarks"]["arc_c"]["count"] == 3
    header = table.splitlines()[0]
    for col in ("AIME24", "AIME25", "AMC", "MATH-500", "Minerva", "Olympiad", "ARC-c", "GPQA", "MMLU-Pro"):
        assert col in header
    assert "ID avg (1 of 6)" in header and "OOD avg (1 of 3)" in header
    row = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert row[1] == "avg@2" and row[2] == f"{100 * result['benchmarks']['aime24']['avg@2']:.1f}"
    assert row[3] == "-"  # AIME25 not evaluated
    assert result["paper_row"]["avg@2"]["ID avg"] == result["benchmarks"]["aime24"]["avg@2"]
    assert len(lines) == 2 * len(records)
    assert [x["correct"] for x in lines] == [bool(c) for i in sorted(verdicts) for c in verdicts[i]]
    assert {x["data_source"] for x in lines} == {"aime24", "arc_c"}
    assert "AIME24" in capsys.readouterr().out


@pytest.mark.slow  # a training run, then the benchmark CLI: slow set (CI runs it)
def test_checkpoint_params_are_restored(tmp_path, files, byo):
    cfg = config_lib.build_config({
        "model": {"path": byo[0]}, "data": {"train": files[0], "eval": "", "max_prompt_len": MAX_PROMPT},
        "rl": {"prompts_per_step": 4, "group_size": 2}, "sampling": {"max_new_tokens": 6}})  # fmt: skip
    s = build_setup(cfg, log=lambda _: None)
    _, params1 = nnx.split(load_model(byo[1], s.mesh))
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
    ckpt.save(3, s.state._replace(params=params1), {"config": config_lib.to_dict(cfg), "data": {}})
    ckpt.close()
    from_ckpt, _, r_ckpt = run(tmp_path, "c", files, "--checkpoint", str(tmp_path / "run"))
    _, _, r_seed1 = run(tmp_path, "s1", files, "--model", byo[1])
    _, _, r_seed0 = run(tmp_path, "s0", files, "--model", byo[0])
    assert from_ckpt["step"] == 3
    # The row names what trained the checkpoint (its saved config: the grpo preset, EchoRL on by default).
    assert from_ckpt["label"] == f"GRPO (DeepSeekMath) + EchoRL: {tmp_path / 'run'} (step 3)"
    texts = lambda lines: [x["response"] for x in lines]
    assert texts(r_ckpt) == texts(r_seed1) != texts(r_seed0)  # the checkpoint's params, not model.path's
    _, _, r_step = run(tmp_path, "st", files, "--checkpoint", str(tmp_path / "run" / "checkpoints" / "3"))
    assert texts(r_step) == texts(r_seed1)


@pytest.mark.slow  # a training run, then an evaluation: slow set (CI runs it)
def test_evaluation_builds_no_optimizer_state(tmp_path, files, byo, monkeypatch):
    """Only the parameters: no optimizer moments are created, and a checkpoint's are not read."""
    from echorl_jax.rl import update

    cfg = config_lib.build_config({
        "model": {"path": byo[0]}, "data": {"train": files[0], "eval": "", "max_prompt_len": MAX_PROMPT},
        "rl": {"prompts_per_step": 4, "group_size": 2}, "sampling": {"max_new_tokens": 6}})  # fmt: skip
    s = build_setup(cfg, log=lambda _: None)
    _, params1 = nnx.split(load_model(byo[1], s.mesh))
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
    ckpt.save(2, s.state._replace(params=params1), {"config": config_lib.to_dict(cfg), "data": {}})
    ckpt.close()

    def no_optimizer_state(*args, **kwargs):
        raise AssertionError("evaluation built an optimizer state")

    monkeypatch.setattr(update, "init_opt_state", no_optimizer_state)
    restored = []
    restore = Checkpointer.restore
    monkeypatch.setattr(Checkpointer, "restore", lambda self, target, step=None: restored.append(
        restore(self, target, step)) or restored[-1])  # fmt: skip
    _, _, lines = run(tmp_path, "c", files, "--checkpoint", str(tmp_path / "run"))
    _, _, want = run(tmp_path, "s1", files, "--model", byo[1])
    assert [x["response"] for x in lines] == [x["response"] for x in want]  # the checkpoint's params
    opt = jax.tree.leaves(restored[0][1].opt_state, is_leaf=lambda x: x is Ellipsis)
    assert opt and all(x is Ellipsis for x in opt)  # Orbax's placeholder: the saved moments were not read


def test_bad_checkpoint_is_a_clear_error(tmp_path, files, capsys):
    assert benchmark.main(["--checkpoint", str(tmp_path), "--data", files[0]]) == 2
    assert "not a training workdir" in capsys.readouterr().err


def test_paper_table_averages():
    scores = {src: {"avg@4": v, "pass@4": 1.0, "count": 1.0}
              for src, v in zip(paper_table.PAPER_SOURCES, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])}
    row = paper_table.summary_row(scores, "avg@4")
    assert row["ID avg"] == pytest.approx(0.35) and row["OOD avg"] == pytest.approx(0.8)
    line = paper_table.markdown_table([("run", scores)], 4).splitlines()[2]
    assert line == "| run | avg@4 | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 | 60.0 | 35.0 | 70.0 | 80.0 | 90.0 | 80.0 |"
