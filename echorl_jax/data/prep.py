"""Convert a known source's Hugging Face dataset into the verl parquet the trainer reads.

    python -m echorl_jax.data_prep SOURCE [INPUT ...] [--out PATH] [--seed 0] [--prompt-style paper|r1|source]
    python -m echorl_jax.data_prep --list

Without INPUT the source's Hub dataset is loaded with ``datasets.load_dataset`` (the only
network access; ``HF_DATASETS_OFFLINE=1`` uses the cache): ``python -m echorl_jax.data_prep
openr1_math_46k`` is the whole step. INPUT: parquet / JSONL / JSON files of one source
(several = shards, concatenated), or a directory written by ``Dataset.save_to_disk``.
Each output row is::

    {"data_source": SOURCE, "prompt": [{"role": "user", "content": TEXT}], "ability": "math"|"choice",
     "reward_model": {"style": "rule", "ground_truth": ANSWER},
     "extra_info": {"index": i, "split": ..., "problem": ..., ["choices": [...]]}, ["expert": TRACE]}

With ``--prompt-style paper`` (default) TEXT is the paper's prompt (``MATH_TEMPLATE``);
multiple-choice sets list their options as ``A. ...`` lines (``CHOICE_TEMPLATE``) and their
answer is the letter; their data_sources are routed to the ``choice`` verifier (rewards/choice.py).
``r1``: LUFFY's own format, a system message with its R1-style instruction (``R1_SYSTEM``) and
the bare problem as the user turn (options as ``A) ...`` lines), as in LUFFY's ``data/valid.*.parquet``;
``source``: the dataset's own ``prompt`` messages unchanged (OpenR1-Math-46k ships LUFFY's). Both
write ``NAME_r1.parquet`` / ``NAME_source.parquet`` beside the default output.
OpenR1-Math-46k keeps its DeepSeek-R1 trace as the top-level ``expert`` column
(LUFFY's off-policy responses). Instructions a source bakes into its prompts
(DAPO's "Answer:" format, a system prompt) are dropped so every set gets the same
template. Each source is one ``SOURCES`` entry: which columns hold the problem,
the answer, the options and the trace -- the first present of each list.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from echorl_jax.data.formats import DataError
from echorl_jax.rewards.choice import CHOICE_SOURCES, LETTERS
from echorl_jax.rewards.math import last_boxed

MATH_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CHOICE_TEMPLATE = (
    "{problem}\n\n{options}\nPlease reason step by step, and put your final answer (the letter of the correct "
    "option) within \\boxed{{}}."
)
_DAPO_HEAD = "Solve the following math problem step by step."
_DAPO_TAIL = '\n\nRemember to put your answer on its own line after "Answer:".'
_OWN_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# LUFFY's system prompt (luffy/scripts/data/prepare_openr1_data_spec_sys.py:80; its data/valid.parquet rows).
R1_SYSTEM = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final solution. This "
    "involves analyzing, summarizing, exploring, reassessing, and refining your thought process through multiple "
    "iterations. Structure your response into two sections: Thought and Solution. In the Thought section, present "
    'your reasoning using the format: "<think>\n {thoughts} </think>\n". Each thought should include detailed '
    "analysis, brainstorming, verification, and refinement of ideas. After \"</think>\n,\" in the Solution section, "
    "provide the final, logical, and accurate answer, clearly derived from the exploration in the Thought section. "
    "If applicable, include the answer in \\boxed{} for closed-form results like multiple choices or mathematical "
    "solutions."
)
PROMPT_STYLES = ("paper", "r1", "source")


@dataclasses.dataclass(frozen=True)
class Source:
    """One dataset family: where its fields live, and where its converted file goes by default."""

    out: str  # default output path (configs/paper/ recipes read these)
    split: str  # "train" | "test"
    problem: tuple[str, ...]  # columns holding the problem text (a string, or chat messages: last user turn)
    answer: tuple[str, ...] = ()  # answer columns; "boxed:COL" = the last \boxed{} in COL
    choices: Callable[[dict, int, int], tuple[list[str], str]] | None = None  # row, index, seed -> options, letter
    choice_columns: tuple[str, ...] = ()  # columns the choices function reads (all required)
    expert: tuple[str, ...] = ()  # expert trace columns (a string, or chat messages: last assistant turn)
    dedupe: bool = False  # drop repeated problems (DAPO-Math-17k ships each prompt many times)
    hub: tuple[str, str | None, str] = ("", None, "")  # datasets.load_dataset(id, config, split=...) without INPUT


def _arc_choices(row: dict, index: int, seed: int) -> tuple[list[str], str]:
    labels, texts = list(row["choices"]["label"]), list(row["choices"]["text"])
    return texts, LETTERS[labels.index(str(row["answerKey"]))]  # labels are A-E or 1-5


def _gpqa_choices(row: dict, index: int, seed: int) -> tuple[list[str], str]:
    options = [row["Correct Answer"], *(row[f"Incorrect Answer {i}"] for i in (1, 2, 3))]
    order = np.random.default_rng([seed, index]).permutation(len(options))  # deterministic per (seed, row)
    return [str(options[j]).strip() for j in order], LETTERS[int(np.flatnonzero(order == 0)[0])]


def _mmlu_pro_choices(row: dict, index: int, seed: int) -> tuple[list[str], str]:
    options = [str(o) for o in row["options"] if str(o).strip() not in ("", "N/A")]
    answer = row.get("answer")
    return options, str(answer).strip().upper() if answer is not None else LETTERS[int(row["answer_index"])]


_EVAL_MATH = dict(split="test", problem=("problem", "question", "Problem"),
                  answer=("answer", "final_answer", "Answer", "boxed:solution"))  # fmt: skip
SOURCES: dict[str, Source] = {
    # training sets
    "math": Source("data/math_train.parquet", "train", ("problem",), ("boxed:solution",),
                   hub=("DigitalLearningGmbH/MATH-lighteval", None, "train")),
    "dapo_math_17k": Source("data/dapo_math_17k.parquet", "train", ("prompt", "problem"),
                            ("reward_model", "answer", "solution"), dedupe=True,
                            hub=("BytedTsinghua-SIA/DAPO-Math-17k", None, "train")),
    # LUFFY's training set (its data/prepare_train.py:4 loads this id)
    "openr1_math_46k": Source("data/openr1_math_46k.parquet", "train", ("prompt", "problem"),
                              ("reward_model", "answer"), expert=("target", "expert", "solution"),
                              hub=("Elliott/Openr1-Math-46k-8192", None, "train")),
    # in-distribution evaluation
    "aime24": Source("data/eval/aime24.parquet", **_EVAL_MATH, hub=("HuggingFaceH4/aime_2024", None, "train")),
    "aime25": Source("data/eval/aime25.parquet", **_EVAL_MATH, hub=("math-ai/aime25", None, "test")),
    "amc23": Source("data/eval/amc23.parquet", **_EVAL_MATH, hub=("math-ai/amc23", None, "test")),
    "math500": Source("data/eval/math500.parquet", **_EVAL_MATH, hub=("HuggingFaceH4/MATH-500", None, "test")),
    "minerva": Source("data/eval/minerva.parquet", **_EVAL_MATH, hub=("math-ai/minervamath", None, "test")),
    "olympiadbench": Source("data/eval/olympiadbench.parquet", **_EVAL_MATH,
                            hub=("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")),
    # out-of-distribution evaluation (multiple choice)
    "arc_c": Source("data/eval/arc_c.parquet", "test", ("question",), choices=_arc_choices,
                    choice_columns=("choices", "answerKey"), hub=("allenai/ai2_arc", "ARC-Challenge", "test")),
    "gpqa_diamond": Source("data/eval/gpqa_diamond.parquet", "test", ("Question", "question"), choices=_gpqa_choices,
                           choice_columns=("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                           "Incorrect Answer 3"), hub=("Idavidrein/gpqa", "gpqa_diamond", "train")),
    "mmlu_pro": Source("data/eval/mmlu_pro.parquet", "test", ("question",), choices=_mmlu_pro_choices,
                       choice_columns=("options", "answer"), hub=("TIGER-Lab/MMLU-Pro", None, "test")),
}  # fmt: skip
assert set(CHOICE_SOURCES) == {k for k, v in SOURCES.items() if v.choices}  # the router's list matches this table


# --------------------------------------------------------------------------- reading


def _datasets():
    try:
        import datasets  # lazily: only the Hub and save_to_disk paths need it
    except ImportError as e:
        raise DataError("reading a Hub dataset or a save_to_disk directory needs the `datasets` package "
                        "(pip install datasets)") from e
    return datasets


def _split_of(ds, split: str, where: str):
    """A Dataset from ``load_dataset``/``load_from_disk``'s result: itself, or its ``split`` of a DatasetDict."""
    if isinstance(ds, _datasets().DatasetDict):
        if split in ds:
            return ds[split]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise DataError(f"{where}: has splits {sorted(ds)}, none named {split!r}; pass --split")
    return ds


def read_hub(repo: str, config: str | None, split: str) -> list[dict]:
    """Rows of a Hub dataset, ``datasets.load_dataset(repo, config, split=split)``."""
    try:
        ds = _datasets().load_dataset(repo, config, split=split)
    except DataError:
        raise
    except Exception as e:  # network, gated repo, unknown config: name what was asked for
        what = f"{repo}" + (f" (config {config!r})" if config else "") + f", split {split!r}"
        raise DataError(f"cannot load the Hub dataset {what}: {type(e).__name__}: {e}") from e
    return _split_of(ds, split, repo).to_list()


def read_rows(path: str | Path, split: str = "train") -> list[dict]:
    """Rows of a parquet / JSONL / JSON (a list of objects) file, or of a ``save_to_disk`` directory
    (its ``split`` when it holds a DatasetDict)."""
    path = Path(path)
    if path.is_dir():
        try:
            ds = _datasets().load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{path}: not a directory written by Dataset.save_to_disk ({e})") from e
        return _split_of(ds, split, str(path)).to_list()
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, list):
                return rows
            raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    except (ValueError, OSError) as e:  # JSONDecodeError is a ValueError; pyarrow raises ArrowInvalid (a ValueError)
        raise DataError(f"{path}: not a readable {path.suffix[1:]} file ({e})") from e
    raise DataError(f"{path}: unknown suffix {path.suffix!r}; expected .parquet, .jsonl or .json")


def _column(name: str) -> str:
    return name.removeprefix("boxed:")


def _first_present(columns: set[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if _column(n) in columns), None)


def check_columns(name: str, src: Source, columns: set[str], path: Path) -> None:
    """Every field of ``src`` has a column in the file, else DataError naming the file and its columns."""
    needs = [("problem", src.problem), ("answer", src.answer), ("expert trace", src.expert)]
    missing = [f"the {what}: one of {list(map(_column, names))}" for what, names in needs
               if names and _first_present(columns, names) is None]  # fmt: skip
    missing += [f"the options: column {c!r}" for c in src.choice_columns if c not in columns]
    if missing:
        raise DataError(f"{path}: not a {name!r} export: it needs a column for {'; '.join(missing)}; "
                        f"the file has columns {sorted(columns)}")  # fmt: skip


# --------------------------------------------------------------------------- fields


def _message_text(value: Any, role: str) -> str | None:
    """A string as is; a chat message list: the content of its last ``role`` turn."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        turns = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == role]
        if turns and isinstance(turns[-1], str):
            return turns[-1]
    return None


def clean_problem(text: str) -> str:
    """The bare problem: a source's own answer-format instructions removed (DAPO's, the paper's sentence)."""
    text = text.strip()
    if text.startswith(_DAPO_HEAD) and "\n\n" in text:
        text = text.split("\n\n", 1)[1]
    for tail in (_DAPO_TAIL.strip(), _OWN_INSTRUCTION):
        if text.endswith(tail):
            text = text[: -len(tail)]
    return text.strip()


def _answer_text(value: Any) -> str | None:
    """Answers as the verifier's string: struct -> ground_truth, list -> joined, 27.0 -> "27", $x$ -> x."""
    if isinstance(value, dict):
        value = value.get("ground_truth")
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value) if value else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if len(value) > 2 and value.startswith("$") and value.endswith("$") and value.count("$") == 2:
        value = value[1:-1].strip()
    return value


def _field(row: dict, names: tuple[str, ...], parse: Callable[[Any], str | None], what: str, where: str) -> str:
    for n in names:
        col = _column(n)
        if row.get(col) is None:
            continue
        value = row[col]
        if n.startswith("boxed:"):
            value = last_boxed(value) if isinstance(value, str) else None
        text = parse(value)
        if text:
            return text
    raise DataError(f"{where}: no usable {what} in column(s) {list(map(_column, names))} "
                    f"(values {[str(row.get(_column(n)))[:80] for n in names]})")  # fmt: skip


def _source_prompt(row: dict, where: str):
    """--prompt-style source: the row's own ``prompt`` (a string or chat messages), unchanged."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        return [{"role": m["role"], "content": m.get("content")} for m in prompt]
    raise DataError(f"{where}: --prompt-style source keeps the dataset's own 'prompt' column, but the row has "
                    f"{'prompt ' + repr(prompt)[:80] if 'prompt' in row else 'no prompt column'}")


def convert_row(name: str, src: Source, row: dict, index: int, seed: int, where: str, style: str = "paper") -> dict:
    problem = clean_problem(_field(row, src.problem, lambda v: _message_text(v, "user"), "problem", where))
    extra: dict[str, Any] = {"index": index, "split": src.split, "problem": problem}
    if src.choices is not None:
        try:
            options, answer = src.choices(row, index, seed)
        except (KeyError, ValueError, IndexError, TypeError) as e:
            raise DataError(f"{where}: cannot read the options/answer ({type(e).__name__}: {e})") from None
        if not options or len(options) > len(LETTERS) or answer not in LETTERS[: len(options)]:
            raise DataError(f"{where}: answer {answer!r} is not one of the {len(options)} options' letters")
        if style == "r1":  # LUFFY's data/valid.arc_c.parquet: "A) ..." lines after a blank line
            content = problem + "\n\n" + "".join(f"{LETTERS[i]}) {str(o).strip()}\n" for i, o in enumerate(options))
        else:
            listed = "\n".join(f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options))
            content = CHOICE_TEMPLATE.format(problem=problem, options=listed)
        extra["choices"] = [str(o).strip() for o in options]
    else:
        answer = _field(row, src.answer, _answer_text, "answer", where)
        content = problem if style == "r1" else MATH_TEMPLATE.format(problem=problem)
    prompt: Any = [{"role": "user", "content": content}]
    if style == "r1":
        prompt = [{"role": "system", "content": R1_SYSTEM}, *prompt]
    elif style == "source":
        prompt = _source_prompt(row, where)
    out = {
        "data_source": name,
        "prompt": prompt,
        "ability": "choice" if src.choices is not None else "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": extra,
    }
    if src.expert:
        out["expert"] = _field(row, src.expert, lambda v: _message_text(v, "assistant"), "expert trace", where)
    return out


def hub_of(name: str, repo: str = "", config: str | None = None, split: str = "") -> tuple[str, str | None, str]:
    """``(repo, config, split)`` to load for source ``name``: its Hub dataset, each part overridable."""
    src_repo, src_config, src_split = SOURCES[name].hub
    return repo or src_repo, config if repo else (config or src_config), split or src_split


def convert(name: str, inputs: list[str | Path], seed: int = 0, prompt_style: str = "paper",
            hub: tuple[str, str | None, str] | None = None) -> list[dict]:
    """Rows of ``inputs`` (one source's files or save_to_disk directories, in order), or of its Hub dataset
    when there are none (``hub``: ``(repo, config, split)``, default ``hub_of(name)``), in the verl schema."""
    if name not in SOURCES:
        raise DataError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    if prompt_style not in PROMPT_STYLES:
        raise DataError(f"--prompt-style {prompt_style!r}: expected one of {list(PROMPT_STYLES)}")
    src = SOURCES[name]
    repo, config, split = hub or hub_of(name)
    parts = [(Path(p), lambda p=p: read_rows(p, split)) for p in inputs] or [(repo, lambda: read_hub(repo, config, split))]
    out, seen = [], set()
    for path, read in parts:
        rows = read()
        if not rows:
            raise DataError(f"{path}: no rows")
        check_columns(name, src, set().union(*(r.keys() for r in rows[:100])), path)
        for i, row in enumerate(rows):
            rec = convert_row(name, src, row, len(out), seed, f"{path}, row {i}", prompt_style)
            if src.dedupe:
                key = rec["extra_info"]["problem"]
                if key in seen:
                    continue
                seen.add(key)
            out.append(rec)
    return out


def write_parquet(rows: list[dict], out: str | Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echorl_jax.data_prep", description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", help=f"one of: {', '.join(SOURCES)}")
    parser.add_argument("inputs", nargs="*", help="the source's files (.parquet/.jsonl/.json) or save_to_disk "
                        "directories; none = load its Hub dataset (--list shows which)")
    parser.add_argument("--out", default="", help="output parquet (default: the source's path in --list)")
    parser.add_argument("--seed", type=int, default=0, help="option shuffle seed (GPQA)")
    parser.add_argument("--prompt-style", default="paper", choices=PROMPT_STYLES,
                        help="paper: our prompt (default); r1: LUFFY's R1 system prompt + the bare problem; "
                             "source: the dataset's own prompt column")
    parser.add_argument("--hub", default="", help="load this Hub dataset id instead of the source's")
    parser.add_argument("--hub-config", default=None, help="the Hub dataset's config (subset) name")
    parser.add_argument("--split", default="", help="split to read (default: the source's, --list)")
    parser.add_argument("--list", action="store_true", help="list the sources and their default outputs")
    args = parser.parse_args(argv)
    if args.list or not args.source:
        for name, src in SOURCES.items():
            repo, config, split = src.hub
            hub = f"{repo}" + (f" ({config})" if config else "") + f" [{split}]"
            print(f"{name:16s} -> {src.out}   hub {hub}   problem {list(src.problem)} answer "
                  f"{list(src.answer) or list(src.choice_columns)}" + (f" expert {list(src.expert)}" if src.expert else ""))
        return 0
    if args.source not in SOURCES:
        print(f"error: unknown source {args.source!r}; known: {', '.join(SOURCES)}", file=sys.stderr)
        return 2
    try:
        hub = hub_of(args.source, args.hub, args.hub_config, args.split)
        rows = convert(args.source, args.inputs, seed=args.seed, prompt_style=args.prompt_style, hub=hub)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = SOURCES[args.source].out
    if args.prompt_style != "paper":
        out = out.removesuffix(".parquet") + f"_{args.prompt_style}.parquet"
    path = write_parquet(rows, args.out or out)
    print(f"wrote {len(rows)} rows to {path}")
    return 0

