"""data_prep: each source family's export -> verl parquet the trainer loads; clear errors for unknown files."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from echorl_jax.data import prep
from echorl_jax.data.formats import DataError, load_records
from echorl_jax.rewards import RewardRow, build_router
from echorl_jax.rewards.router import RewardConfig

INSTR = "Please reason step by step, and put your final answer within \\boxed{}."


def write(tmp_path, name, rows, fmt="parquet"):
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def run_prep(tmp_path, source, rows, fmt="parquet", **kw):
    """Convert through the CLI, then read back with the trainer's loader."""
    src = write(tmp_path, f"in_{source}", rows, fmt)
    out = tmp_path / "out" / f"{source}.parquet"
    assert prep.main([source, str(src), "--out", str(out), *kw.get("args", ())]) == 0
    return load_records(out), pq.read_table(out).to_pylist()


def user_text(rec):
    assert rec["prompt"][0]["role"] == "user" and len(rec["prompt"]) == 1
    return rec["prompt"][0]["content"]


def test_math_answer_is_the_last_box_of_the_solution(tmp_path):
    rows = [{"problem": "What is $1+1$?", "solution": "First \\boxed{3}... no: $1+1=\\boxed{2}$.", "level": "Level 1",
             "type": "Algebra"}]
    recs, raw = run_prep(tmp_path, "math", rows, fmt="jsonl")
    assert recs[0]["ground_truth"] == "2" and recs[0]["data_source"] == "math"
    assert user_text(recs[0]) == "What is $1+1$?\n" + INSTR
    assert raw[0]["reward_model"] == {"style": "rule", "ground_truth": "2"}
    assert raw[0]["extra_info"]["split"] == "train" and raw[0]["ability"] == "math"


def test_dapo_instructions_are_replaced_and_duplicates_dropped(tmp_path):
    dapo = ("Solve the following math problem step by step. The last line of your response should be of the form "
            "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nFind $x$ if $x+1=3$."
            '\n\nRemember to put your answer on its own line after "Answer:".')
    row = {"data_source": "math_dapo", "prompt": [{"role": "user", "content": dapo}], "ability": "MATH",
           "reward_model": {"ground_truth": "2", "style": "rule-lighteval/MATH_v2"}, "extra_info": {"index": "a"}}
    other = dict(row, prompt=[{"role": "user", "content": dapo.replace("x+1=3", "x+2=3")}],
                 reward_model={"ground_truth": "1", "style": "rule"})
    recs, _ = run_prep(tmp_path, "dapo_math_17k", [row, row, other, row])
    assert [r["ground_truth"] for r in recs] == ["2", "1"]
    assert user_text(recs[0]) == "Find $x$ if $x+1=3$.\n" + INSTR
    assert recs[0]["data_source"] == "dapo_math_17k"


def test_openr1_keeps_the_expert_trace_as_a_column(tmp_path):
    rows = [{"data_source": "openr1", "prompt": [{"role": "system", "content": "You are helpful."},
                                                 {"role": "user", "content": "Compute $2^3$."}],
             "target": [{"role": "assistant", "content": "<think>\n2*2*2 = 8\n</think>\n\n\\boxed{8}"}],
             "ability": "math", "reward_model": {"ground_truth": "8", "style": "rule"},
             "extra_info": {"index": 0, "split": "default"}}]
    recs, raw = run_prep(tmp_path, "openr1_math_46k", rows)
    assert recs[0]["expert"] == "<think>\n2*2*2 = 8\n</think>\n\n\\boxed{8}"
    assert "expert" in pq.read_schema(tmp_path / "out" / "openr1_math_46k.parquet").names  # top-level column
    assert user_text(recs[0]) == "Compute $2^3$.\n" + INSTR  # the system prompt is not carried over
    assert recs[0]["ground_truth"] == "8"


@pytest.mark.parametrize("source,row,answer", [
    ("aime24", {"id": 60, "problem": "Find N.", "solution": "...", "answer": "204", "url": "u"}, "204"),
    ("amc23", {"id": 0, "question": "Find N.", "answer": 27.0}, "27"),
    ("math500", {"problem": "Find N.", "solution": "\\boxed{\\frac12}", "answer": "\\frac{1}{2}",
                 "subject": "Algebra", "level": 2, "unique_id": "x"}, "\\frac{1}{2}"),
    ("minerva", {"problem": "Find N.", "solution": "so \\boxed{4.5}"}, "4.5"),
    ("olympiadbench", {"question": "Find N.", "final_answer": ["$\\frac{1}{3}$"], "id": 1}, "\\frac{1}{3}"),
])  # fmt: skip
def test_math_eval_sets(tmp_path, source, row, answer):
    recs, raw = run_prep(tmp_path, source, [row])
    assert recs[0]["ground_truth"] == answer and recs[0]["data_source"] == source
    assert user_text(recs[0]) == "Find N.\n" + INSTR and raw[0]["extra_info"]["split"] == "test"


def test_arc_choices_and_numeric_labels(tmp_path):
    rows = [{"id": "q1", "question": "Which is a gas?", "choices": {"text": ["Ice", "Steam", "Rock"],
                                                                    "label": ["A", "B", "C"]}, "answerKey": "B"},
            {"id": "q2", "question": "Pick two.", "choices": {"text": ["one", "two"], "label": ["1", "2"]},
             "answerKey": "2"}]  # fmt: skip
    recs, raw = run_prep(tmp_path, "arc_c", rows)
    assert [r["ground_truth"] for r in recs] == ["B", "B"]
    assert "Which is a gas?\n\nA. Ice\nB. Steam\nC. Rock\n" in user_text(recs[0])
    assert "letter of the correct option" in user_text(recs[0]) and raw[0]["ability"] == "choice"
    assert raw[1]["extra_info"]["choices"] == ["one", "two"]


def test_gpqa_shuffle_is_deterministic_by_seed_and_the_letter_follows_the_answer(tmp_path):
    rows = [{"Question": f"Q{i}?", "Correct Answer": "right", "Incorrect Answer 1": "w1",
             "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"} for i in range(12)]  # fmt: skip
    a = prep.convert("gpqa_diamond", [write(tmp_path, "g", rows)], seed=0)
    b = prep.convert("gpqa_diamond", [write(tmp_path, "g", rows)], seed=0)
    c = prep.convert("gpqa_diamond", [write(tmp_path, "g", rows)], seed=1)
    assert a == b and a != c
    for rec in a:
        choices, letter = rec["extra_info"]["choices"], rec["reward_model"]["ground_truth"]
        assert sorted(choices) == ["right", "w1", "w2", "w3"]
        assert choices["ABCD".index(letter)] == "right"
    assert len({r["reward_model"]["ground_truth"] for r in a}) > 1  # not always the same position


def test_mmlu_pro_ten_options(tmp_path):
    rows = [{"question_id": 1, "question": "Pick J.", "options": [f"o{i}" for i in range(10)], "answer": "J",
             "answer_index": 9, "cot_content": "", "category": "math", "src": "x"}]  # fmt: skip
    recs, raw = run_prep(tmp_path, "mmlu_pro", rows, fmt="json")
    assert recs[0]["ground_truth"] == "J" and "J. o9" in user_text(recs[0])


def test_choice_sources_route_to_the_choice_verifier(tmp_path):
    router = build_router(RewardConfig())
    for source in ("arc_c", "gpqa_diamond", "mmlu_pro"):
        assert router.verifier_for(source) == "choice"
    assert router.verifier_for("aime24") == "math"
    res = router(["The answer is (B).", "\\boxed{C}"], ["B", "B"],
                 [RewardRow("arc_c", {"choices": ["x", "y", "z"]}, None, 0)] * 2)
    assert res.correct_n.tolist() == [True, False]


def test_unknown_columns_name_the_file_and_the_columns_found(tmp_path):
    path = write(tmp_path, "weird", [{"text": "hi", "label": 3}])
    with pytest.raises(DataError, match=r"weird.parquet: not a 'aime24' export.*problem.*'problem', 'question'.*"
                                        r"has columns \['label', 'text'\]"):
        prep.convert("aime24", [path])
    with pytest.raises(DataError, match=r"not a 'openr1_math_46k' export.*expert trace"):
        prep.convert("openr1_math_46k", [write(tmp_path, "noexp", [{"problem": "p", "answer": "1"}])])
    with pytest.raises(DataError, match="unknown source 'gsm9k'"):
        prep.convert("gsm9k", [path])
    assert prep.main(["aime24", str(path)]) == 2


def test_a_row_without_an_answer_names_the_row(tmp_path):
    path = write(tmp_path, "m", [{"problem": "p", "solution": "\\boxed{1}"}, {"problem": "q", "solution": "none"}],
                 fmt="jsonl")
    with pytest.raises(DataError, match=r"m.jsonl, row 1: no usable answer"):
        prep.convert("math", [path])


# ----------------------------------------------------------------------------- Hub datasets, saved datasets, prompt styles

R1_ROW = {"data_source": "openr1", "ability": "math", "reward_model": {"ground_truth": "8", "style": "rule"},
          "prompt": [{"role": "system", "content": prep.R1_SYSTEM}, {"role": "user", "content": "Compute $2^3$."}],
          "target": [{"role": "assistant", "content": "<think>\n2*2*2 = 8\n</think>\n\n\\boxed{8}"}],
          "extra_info": {"index": 0, "split": "default"}}  # fmt: skip


def test_a_saved_dataset_directory_is_an_input(tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([R1_ROW, R1_ROW]),
                          "test": datasets.Dataset.from_list([dict(R1_ROW, reward_model={"ground_truth": "9", "style": "rule"})])
                          }).save_to_disk(str(d))  # fmt: skip
    out = tmp_path / "out.parquet"
    assert prep.main(["openr1_math_46k", str(d), "--out", str(out)]) == 0  # the source's split: train
    recs = load_records(out)
    assert [r["ground_truth"] for r in recs] == ["8", "8"] and recs[0]["expert"].startswith("<think>\n")
    assert prep.main(["openr1_math_46k", str(d), "--out", str(out), "--split", "test"]) == 0
    assert [r["ground_truth"] for r in load_records(out)] == ["9"]
    assert prep.main(["openr1_math_46k", str(tmp_path), "--out", str(out)]) == 2  # not a saved dataset


def test_no_input_loads_the_sources_hub_dataset(tmp_path, monkeypatch):
    """No download: datasets.load_dataset is replaced by a stand-in that records what it was asked for."""
    datasets = pytest.importorskip("datasets")
    asked = []

    def fake_load_dataset(repo, config=None, split=None):
        asked.append((repo, config, split))
        return datasets.Dataset.from_list([R1_ROW])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    assert prep.main(["openr1_math_46k"]) == 0  # all a user with a network types
    assert asked == [("Elliott/Openr1-Math-46k-8192", None, "train")]
    assert load_records(tmp_path / "data" / "openr1_math_46k.parquet")[0]["ground_truth"] == "8"
    assert prep.main(["arc_c", "--hub", "me/arc", "--split", "validation"]) == 2  # the stand-in has no arc columns
    assert asked[-1] == ("me/arc", None, "validation")
    assert prep.main(["olympiadbench"]) == 2
    assert asked[-1] == ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")

    def failing(repo, config=None, split=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match=r"cannot load the Hub dataset HuggingFaceH4/MATH-500, split 'test': ConnectionError"):
        prep.convert("math500", [])


def test_every_source_names_a_hub_dataset():
    for name, src in prep.SOURCES.items():
        repo, _, split = src.hub
        assert "/" in repo and split in ("train", "test"), name


def test_prompt_styles_source_and_r1(tmp_path):
    src = write(tmp_path, "openr1", [R1_ROW])
    out = tmp_path / "o.parquet"
    assert prep.main(["openr1_math_46k", str(src), "--out", str(out), "--prompt-style", "source"]) == 0
    rec = load_records(out)[0]
    assert rec["prompt"] == R1_ROW["prompt"]  # the dataset's own system prompt and user turn, unchanged
    assert rec["expert"] == R1_ROW["target"][0]["content"]
    assert prep.main(["openr1_math_46k", str(src), "--out", str(out), "--prompt-style", "r1"]) == 0
    assert load_records(out)[0]["prompt"] == R1_ROW["prompt"]  # r1 rebuilds the same format from the problem
    # Multiple choice in LUFFY's format (its data/valid.arc_c.parquet): options as "A) ..." lines.
    arc = write(tmp_path, "arc", [{"question": "Which?", "choices": {"label": ["A", "B"], "text": ["x", "y"]},
                                   "answerKey": "B"}])  # fmt: skip
    assert prep.main(["arc_c", str(arc), "--out", str(out), "--prompt-style", "r1"]) == 0
    rec = load_records(out)[0]
    assert rec["prompt"][1] == {"role": "user", "content": "Which?\n\nA) x\nB) y\n"} and rec["ground_truth"] == "B"
    # Default output names carry the style; a source without its own prompt column cannot keep it.
    math = write(tmp_path, "m", [{"problem": "1+1?", "answer": "2"}])
    monkey_out = tmp_path / "cwd"
    monkey_out.mkdir()
    old = os.getcwd()
    os.chdir(monkey_out)
    try:
        assert prep.main(["math500", str(math), "--prompt-style", "r1"]) == 0
        assert (monkey_out / "data" / "eval" / "math500_r1.parquet").is_file()
        assert prep.main(["math500", str(math), "--prompt-style", "source"]) == 2
    finally:
        os.chdir(old)
