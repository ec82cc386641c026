"""Dataset file formats: read verl-style parquet, JSONL and JSON into records.

A record is a plain dict::

    {"prompt": str | [{"role": str, "content": str}, ...],
     "ground_truth": str, "data_source": str, **extra_columns}

Columns: the prompt is `prompt`|`question`, the answer
`reward_model.ground_truth`|`ground_truth`|`answer` (first present), unless
`prompt_key`/`answer_key` name them (a dotted key reads a nested struct).
`data_source` defaults to the file's stem. A list of files is a mixture: records
concatenated in order (`load_files`).

Every user-caused problem (missing file, unknown suffix, bad JSON, missing
column, wrong type) raises `DataError` naming the file and the row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Prompt = str | list[dict[str, str]]

SUFFIXES = (".parquet", ".jsonl", ".json")


class DataError(ValueError):
    """A data file, row or prompt that cannot be used; the message names it."""


def _where(path: Path, row: int, line: int | None = None) -> str:
    return f"{path}, line {line} (row {row})" if line is not None else f"{path}, row {row}"


def _as_messages(value: Any) -> list | None:
    """`value` if it is a non-empty list of {role: str, content: str} dicts, else None."""
    if not (isinstance(value, (list, tuple)) and value):
        return None
    if all(isinstance(m, dict) and isinstance(m.get("role"), str)
           and isinstance(m.get("content"), str) for m in value):
        return list(value)
    return None


def decode_json_messages(text: str) -> list | None:
    """A string holding a JSON-encoded message list -> that list; anything else -> None.

    Some exporters (pandas, `datasets.to_json`) write a chat prompt as the JSON
    text of its message list; rendered as plain text it would be one long prompt.
    """
    if not text.lstrip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return _as_messages(value)


def normalize_prompt(prompt: Any, where: str) -> Prompt:
    """A non-empty string, or a non-empty list of {role, content} string messages.

    A string that parses as a JSON list of {role, content} messages is decoded into them.
    """
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{where}: 'prompt' is an empty string")
        prompt = decode_json_messages(prompt) or prompt
        if isinstance(prompt, str):
            return prompt
    if isinstance(prompt, (list, tuple)) and prompt:
        messages = []
        for j, m in enumerate(prompt):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise DataError(
                    f"{where}: prompt message {j} must be {{'role': str, 'content': str}},"
                    f" got {m!r:.200}")
            # Only role/content: parquet struct unification pads messages with
            # None-valued fields (tool_calls, ...) that chat templates choke on.
            messages.append({"role": m["role"], "content": m["content"]})
        return messages
    raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of chat"
                    f" messages {{role, content}}, got {type(prompt).__name__}: {prompt!r:.200}")


def _ground_truth(value: Any, key: str, where: str) -> str:
    # Numeric answers (GSM8K-style JSONL) are accepted and stringified; the
    # verifiers compare strings. bool is an int subclass but never an answer.
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise DataError(f"{where}: {key!r} must be a string (or number),"
                    f" got {type(value).__name__}: {value!r:.200}")


def _data_source(row: dict, where: str, default: str | None) -> str:
    value = row.get("data_source")
    if value is None and default is not None:  # absent (or JSON null): the file's stem
        return default
    if not isinstance(value, str):
        raise DataError(f"{where}: 'data_source' must be a string,"
                        f" got {type(value).__name__}: {value!r:.200}")
    return value


PROMPT_KEYS = ("prompt", "question")
ANSWER_KEYS = ("reward_model.ground_truth", "ground_truth", "answer")  # verl's first


def _lookup(row: dict, key: str, where: str) -> Any:
    """`row[key]`; a dotted key reads a nested struct (`reward_model.ground_truth`)."""
    head, _, rest = key.partition(".")
    if head not in row:
        raise DataError(f"{where}: missing {head!r} (data key {key!r}; row has keys {sorted(row)})")
    value = row[head]
    if rest:
        if isinstance(value, dict) and rest in value and value[rest] is None:
            raise DataError(f"{where}: {key!r} is null (a row needs a value there)")
        if not isinstance(value, dict) or value.get(rest) is None:
            raise DataError(f"{where}: {head!r} must be a struct with a {rest!r} field"
                            f" (data key {key!r}), got {value!r:.200}")
        value = value[rest]
    if value is None:
        raise DataError(f"{where}: {key!r} is null")
    return value


def _pick_key(row: dict, given: str, auto: tuple[str, ...], what: str, where: str, prefix: str = "data.") -> str:
    if given:
        return given
    present = [k for k in auto if k.partition(".")[0] in row]
    if present:  # a null column (e.g. in a union of schemas) yields to a filled one
        return next((k for k in present if row[k.partition(".")[0]] is not None), present[0])
    raise DataError(f"{where}: missing {what.split('_')[0]} column"
                    f" {' or '.join(repr(k) for k in auto)} (row has keys {sorted(row)};"
                    f" set {prefix}{what} to name it)")


def normalize_row(row: Any, where: str, default_source: str | None,
                  prompt_key: str = "", answer_key: str = "", key_prefix: str = "data.") -> dict:
    """One file row -> a record. Keys "" = auto: `prompt`|`question`, and
    `reward_model.ground_truth`|`ground_truth`|`answer`. Other columns are kept. ``key_prefix`` names the
    config keys in errors (``data.`` -> ``data.prompt_key``; ``data.eval_`` for the eval files)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    pk = _pick_key(row, prompt_key, PROMPT_KEYS, "prompt_key", where, key_prefix)
    gk = _pick_key(row, answer_key, ANSWER_KEYS, "answer_key", where, key_prefix)
    used = {pk.partition(".")[0], gk.partition(".")[0], "data_source"}
    return {
        **{k: v for k, v in row.items() if k not in used},
        "prompt": normalize_prompt(_lookup(row, pk, where), where),
        "ground_truth": _ground_truth(_lookup(row, gk, where), gk, where),
        "data_source": _data_source(row, where, default_source),
    }


def read_parquet(path: Path, prompt_key: str = "", answer_key: str = "", key_prefix: str = "data.") -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    columns = set(table.column_names)
    missing = []
    for given, auto in ((prompt_key, PROMPT_KEYS), (answer_key, ANSWER_KEYS)):
        keys = (given,) if given else auto
        if not any(k.partition(".")[0] in columns for k in keys):
            missing.append(" or ".join(map(repr, keys)))
    if missing:
        raise DataError(
            f"{path}, row 0: missing column(s) {', '.join(missing)}; verl-style parquet has"
            f" 'prompt', 'reward_model' (struct with 'ground_truth') and 'data_source', or set"
            f" {key_prefix}prompt_key / {key_prefix}answer_key (found columns {table.column_names})")
    # verl files always carry data_source: a null there is an error, not the file name.
    source = None if "data_source" in columns else path.stem
    return [normalize_row(r, _where(path, i), source, prompt_key, answer_key, key_prefix)
            for i, r in enumerate(table.to_pylist())]


def read_jsonl(path: Path, prompt_key: str = "", answer_key: str = "", key_prefix: str = "data.") -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            where = _where(path, len(records), line_no)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
            records.append(normalize_row(row, where, path.stem, prompt_key, answer_key, key_prefix))
    return records


def read_json(path: Path, prompt_key: str = "", answer_key: str = "", key_prefix: str = "data.") -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}"
                        f" column {e.colno})") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    return [normalize_row(r, _where(path, i), path.stem, prompt_key, answer_key, key_prefix)
            for i, r in enumerate(rows)]


def load_records(path: str | Path, prompt_key: str = "", answer_key: str = "", key_prefix: str = "data.") -> list[dict]:
    """Read one data file into records, dispatching on its suffix (``key_prefix``: see ``normalize_row``)."""
    path = Path(path)
    readers = {".parquet": read_parquet, ".jsonl": read_jsonl, ".json": read_json}
    if path.is_dir():
        found = sorted(str(f.name) for f in path.iterdir() if f.suffix in readers)[:5]
        raise DataError(f"{path}: is a directory; give data files ({', '.join(readers)}), e.g. "
                        + (", ".join(str(path / f) for f in found) if found else "none found in it")
                        + " (several files: a comma-separated list or a tuple)")
    if path.suffix not in readers:
        raise DataError(f"{path}: unknown data file suffix {path.suffix!r};"
                        f" expected one of {list(readers)}")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    return readers[path.suffix](path, prompt_key, answer_key, key_prefix)


def load_files(paths: str | Path | Sequence[str | Path], prompt_key: str = "",
               answer_key: str = "", key_prefix: str = "data.") -> list[dict]:
    """A mixture: each file's records in order, concatenated; each keeps its own data_source."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return [r for p in paths for r in load_records(p, prompt_key, answer_key, key_prefix)]


def require_text_field(records: Sequence[dict], field: str, path: str | Path, why: str) -> None:
    """Every record of file `path` has a non-empty string `field`, else DataError naming the row."""
    for i, r in enumerate(records):
        if not (isinstance(r.get(field), str) and r[field]):
            raise DataError(f"{path}, row {i}: {why} needs a non-empty string {field!r} field"
                            f" (JSONL/JSON key or parquet column); row has keys {sorted(r)}")
