"""analyze_steps on a tiny model: numbers against an unpadded numpy reference, plots and tables written."""

import json

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from byo_fixture import make_byo_dir

from echorl_jax.data import prep
from echorl_jax.data.pipeline import tokenize_prompts
from echorl_jax.evaluation import step_entropy
from echorl_jax.models.hf import load_model
from echorl_jax.models.tokenizer import load_hf_tokenizer

TRACES = ["Step one: 12 + 34\nso 46\n\nThe answer is 46.", "Compute 123 - 7 = 116\nStep by step.\n",
          "the answer\n 1 12 123", "What is 12 + 34? The answer is 46."]  # the last has no newline: one step


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("steps")
    byo = make_byo_dir(d / "byo")
    rows = [{"prompt": [{"role": "user", "content": f"Problem {i}?"}],
             "target": [{"role": "assistant", "content": t}], "reward_model": {"ground_truth": "46"}}
            for i, t in enumerate(TRACES)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), d / "raw.parquet")
    data = prep.write_parquet(prep.convert("openr1_math_46k", [d / "raw.parquet"]), d / "openr1.parquet")
    return byo, str(data), d


def reference(byo, prompt, solution, delimiters=None):
    """Unpadded forward, entropy in numpy, steps split in Python at tokens whose text holds a newline (or at the
    ids in ``delimiters``)."""
    tok = load_hf_tokenizer(byo)
    model = load_model(byo)
    p = tokenize_prompts([prompt], tok, "auto")[0]
    a = tok.encode(solution, add_special_tokens=False)
    ids = jnp.asarray([p + a], jnp.int32)
    logits, _ = model(ids, jnp.arange(ids.shape[1])[None], jnp.ones(ids.shape, bool))
    logits = np.asarray(logits[0, len(p) - 1 : -1], np.float64)
    logq = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    ent = -(np.exp(logq) * logq).sum(-1)
    special = set(tok.all_special_ids)
    steps, cur = [], []
    for t, tid in enumerate(a):
        cur.append(ent[t])
        auto = tid not in special and "\n" in tok.decode([tid])
        if (auto if delimiters is None else tid in delimiters) or t == len(a) - 1:
            steps.append((np.mean(cur), t))
            cur = []
    best = int(np.argmax([s for s, _ in steps]))
    return len(a), steps, best


@pytest.mark.slow  # a warm start, then the analysis: slow set (CI runs it)
def test_expert_traces_match_the_reference(setup, tmp_path):
    byo, data, _ = setup
    out = tmp_path / "out"
    assert step_entropy.main(["--model", byo, "--data", data, "--out", str(out), "--batch", "3"]) == 0
    result = json.loads((out / "summary.json").read_text())
    rows = result["solutions"]
    assert len(rows) == len(TRACES)
    prompts = [json.loads(json.dumps(r)) for r in pq.read_table(data).column("prompt").to_pylist()]
    for row, prompt, trace in zip(rows, prompts, TRACES):
        n, steps, best = reference(byo, prompt, trace)
        assert row["tokens"] == n and row["steps"] == len(steps) and row["argmax_step"] == best
        np.testing.assert_allclose(row["step_entropy"], [s for s, _ in steps], rtol=2e-4, atol=2e-5)
        assert row["clip_len"] == steps[best][1] + 1 and row["rel_pos"] == pytest.approx((steps[best][1] + 1) / n)
    assert rows[3]["steps"] == 1 and rows[3]["rel_pos"] == 1.0
    s = result["summary"]
    assert s["solutions"] == 4 and sum(s["argmax_rel_pos"]["histogram"]) == 4
    assert s["steps"]["max"] == max(r["steps"] for r in rows)
    for png in ("argmax_position.png", "entropy_profile.png", "clip_len_steps.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    md = (out / "summary.md").read_text()
    assert "steps per solution" in md and "argmax-step relative position" in md


def test_rollouts_use_only_correct_responses(setup, tmp_path):
    byo, _, d = setup
    lines = [{"index": i, "data_source": "aime24", "prompt": [{"role": "user", "content": "Q?"}],
              "ground_truth": "46", "sample": 0, "response": t, "correct": i % 2 == 0}
             for i, t in enumerate(TRACES)]  # fmt: skip
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "out"
    assert step_entropy.main(["--model", byo, "--data", str(path), "--source", "rollouts", "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())["solutions"]
    assert [r["tokens"] for r in rows] == [reference(byo, lines[i]["prompt"], TRACES[i])[0] for i in (0, 2)]


@pytest.mark.slow  # a warm start, then the analysis: slow set (CI runs it)
def test_delimiter_ids_as_given(setup, tmp_path, capsys):
    """--delimiter-ids takes echo.delimiter_ids' values: steps end only at the tokens given (here ".")."""
    byo, data, _ = setup
    out = tmp_path / "out"
    assert step_entropy.main(["--model", byo, "--data", data, "--out", str(out), "--delimiter-ids", "['.']"]) == 0
    rows = json.loads((out / "summary.json").read_text())["solutions"]
    dot = set(load_hf_tokenizer(byo).encode(".", add_special_tokens=False))
    prompts = [json.loads(json.dumps(r)) for r in pq.read_table(data).column("prompt").to_pylist()]
    got = [(r["steps"], r["argmax_step"]) for r in rows]
    want = [reference(byo, p, t, delimiters=dot) for p, t in zip(prompts, TRACES)]
    assert got == [(len(steps), best) for _, steps, best in want]
    auto = [reference(byo, p, t) for p, t in zip(prompts, TRACES)]
    assert got != [(len(steps), best) for _, steps, best in auto]  # not the newline rule's steps
    assert step_entropy.main(["--model", byo, "--data", data, "--out", str(out), "--delimiter-ids", "['46 +']"]) == 2
    assert "--delimiter-ids=['46 +']: the text '46 +' is not one token" in capsys.readouterr().err


def test_missing_expert_column_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "1"}) + "\n")
    assert step_entropy.main(["--model", str(tmp_path), "--data", str(path)]) == 2
    assert "needs an 'expert' column" in capsys.readouterr().err
