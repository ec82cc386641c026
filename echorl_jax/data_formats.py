"""Dataset file formats: read verl-style parquet, JSONL and JSON into records.

A record is a plain dict::

    {"prompt": str | [{"role": str, "content": str}, ...],
     "ground_truth": str, "data_source": str, **extra_columns}

Every user-caused problem (missing file, unknown suffix, bad JSON, missing
column, wrong type) raises `DataError` naming the file and the row.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

Prompt = str | list[dict[str, str]]

SUFFIXES = (".parquet", ".jsonl", ".json")


class DataError(ValueError):
    """A data file, row or prompt that cannot be used; the message names it."""


def _where(path: Path, row: int, line: int | None = None) -> str:
    return f"{path}, line {line} (row {row})" if line is not None else f"{path}, row {row}"


def normalize_prompt(prompt: Any, where: str) -> Prompt:
    """A non-empty string, or a non-empty list of {role, content} string messages."""
    if isinstance(prompt, str):
        if not prompt:
            raise DataError(f"{where}: 'prompt' is an empty string")
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


def _data_source(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: 'data_source' must be a string,"
                        f" got {type(value).__name__}: {value!r:.200}")
    return value


def _first_key(row: dict, keys: tuple[str, ...], where: str) -> str:
    for k in keys:
        if k in row and row[k] is not None:
            return k
    raise DataError(f"{where}: missing {' or '.join(repr(k) for k in keys)}"
                    f" (row has keys {sorted(row)})")


def normalize_json_row(row: Any, where: str, default_source: str) -> dict:
    """JSONL/JSON row: `prompt`|`question`, `ground_truth`|`answer`, optional `data_source`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    pk = _first_key(row, ("prompt", "question"), where)
    gk = _first_key(row, ("ground_truth", "answer"), where)
    extra = {k: v for k, v in row.items() if k not in (pk, gk, "data_source")}
    source = row.get("data_source")
    return {
        **extra,
        "prompt": normalize_prompt(row[pk], where),
        "ground_truth": _ground_truth(row[gk], gk, where),
        "data_source": default_source if source is None else _data_source(source, where),
    }


def normalize_verl_row(row: dict, where: str) -> dict:
    """verl parquet row: `prompt`, `reward_model.ground_truth`, `data_source`."""
    rm = row["reward_model"]
    if not isinstance(rm, dict) or rm.get("ground_truth") is None:
        raise DataError(f"{where}: 'reward_model' must be a struct with a 'ground_truth'"
                        f" field, got {rm!r:.200}")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "reward_model", "data_source")}
    return {
        **extra,
        "prompt": normalize_prompt(row["prompt"], where),
        "ground_truth": _ground_truth(rm["ground_truth"], "reward_model.ground_truth", where),
        "data_source": _data_source(row["data_source"], where),
    }


def read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    missing = [c for c in ("prompt", "reward_model", "data_source") if c not in table.column_names]
    if missing:
        raise DataError(
            f"{path}, row 0: missing column(s) {missing}; verl-style parquet needs"
            f" 'prompt', 'reward_model' (struct with 'ground_truth') and 'data_source'"
            f" (found columns {table.column_names})")
    return [normalize_verl_row(r, _where(path, i)) for i, r in enumerate(table.to_pylist())]


def read_jsonl(path: Path) -> list[dict]:
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
            records.append(normalize_json_row(row, where, path.stem))
    return records


def read_json(path: Path) -> list[dict]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}"
                        f" column {e.colno})") from e
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
    return [normalize_json_row(r, _where(path, i), path.stem) for i, r in enumerate(rows)]


def load_records(path: str | Path) -> list[dict]:
    """Read one data file into records, dispatching on its suffix."""
    path = Path(path)
    readers = {".parquet": read_parquet, ".jsonl": read_jsonl, ".json": read_json}
    if path.suffix not in readers:
        raise DataError(f"{path}: unknown data file suffix {path.suffix!r};"
                        f" expected one of {list(readers)}")
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    return readers[path.suffix](path)
