"""Prompt pipelines: render + tokenize once, then a Grain index pipeline.

Construction tokenizes every record, drops (or rejects) prompts longer than
`max_prompt_len`, and keeps the survivors as one flat int32 array plus
offsets. The Grain part is then a pure index map, so its checkpoint state is a
single integer and restoring it replays exactly the same batches:

    train: range(K).shuffle(seed).repeat(E).batch(H*N, drop_remainder)[h*N:(h+1)*N]
    eval:  range(K) padded with -1 to a whole number of H*N batches, each sliced [h*N:(h+1)*N]

(K kept prompts, H hosts, h this host, E epochs, N prompts per host batch.) Every
host walks the same global stream and takes its block of each global batch, so
the hosts' batches concatenated in process order are exactly the one-host batch
of H*N prompts: a seed fixes the run whatever the number of hosts.
"""

from __future__ import annotations

import string
import zlib
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import grain
import jax
import numpy as np

from echorl_jax.data.formats import DataError, Prompt, load_files, load_records  # noqa: F401  (re-export)

__all__ = ["DataError", "PromptBatch", "PromptPipeline", "check_template", "load_files",
           "load_records", "render_prompt", "resolve_template", "tokenize_prompts"]


class PromptBatch(NamedTuple):
    """N prompts, fixed shapes every batch. Consumers must mask rows by `valid_n`."""

    tokens_np: np.ndarray  # int32 [N, P] left-padded with pad_id
    length_n: np.ndarray  # int32 [N] prompt tokens (the rightmost length_n columns)
    ground_truth: list[str]  # [N]
    data_source: list[str]  # [N]
    record_index: np.ndarray  # int64 [N] index into the records list; -1 for padding
    valid_n: np.ndarray  # bool [N] False only for eval padding rows


# --- rendering ----------------------------------------------------------------


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def check_template(template: str) -> None:
    """"auto", "chat", or a format string whose only field is {prompt}; else DataError."""
    if template in ("auto", "chat"):
        return
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise DataError(f"prompt template {template!r} is not a valid format string: {e}") from e
    if fields != {"prompt"}:
        raise DataError(f"prompt template {template!r} must be 'auto', 'chat' or a format string"
                        f" whose only field is {{prompt}} (use {{{{ }}}} for literal braces);"
                        f" found fields {sorted(fields)}")


def resolve_template(template: str, tokenizer: Any) -> str:
    """``data.template`` as applied: "auto" is "chat" when the tokenizer has a chat template (a chat
    model's prompts, strings included, go through it) and "{prompt}" (the text as it is) otherwise."""
    check_template(template)
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "{prompt}"
    return template


def render_prompt(prompt: Prompt, tokenizer: Any, template: str, response_prefix: str = "") -> str:
    """Prompt -> text. `template` is "auto", "chat" or a format string with `{prompt}`; the text then
    ends with `response_prefix` (appended unless the template already wrote it: a think model's chat
    template opens the assistant turn with "<think>\n" itself).

    "auto": "chat" when the tokenizer has a chat template, else "{prompt}" for a string (a message
    list then needs a chat template or an explicit format string) -- ``resolve_template``.
    "chat": the tokenizer's chat template with the generation prompt appended (a
    string prompt becomes one user message). Format string: a string prompt, or a
    message list that is a single user message (its content); longer message lists
    raise rather than silently lose messages.
    """
    text = _render(prompt, tokenizer, template)
    return text if text.endswith(response_prefix) else text + response_prefix


def _render(prompt: Prompt, tokenizer: Any, template: str) -> str:
    given, template = template, resolve_template(template, tokenizer)
    if given == "auto" and template != "chat" and not isinstance(prompt, str):
        raise DataError(f"tokenizer {_tokenizer_name(tokenizer)!r} has no chat template, which"
                        f" data.template='auto' applies to message-list prompts; set"
                        f" data.template (a format string such as '{{prompt}}' takes"
                        f" single-user-message prompts)")
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"tokenizer {_tokenizer_name(tokenizer)!r} has no chat template;"
                            f" use a format-string template such as '{{prompt}}'")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not isinstance(prompt, str):
        roles = [m["role"] for m in prompt]
        if roles != ["user"]:
            raise DataError(f"format-string template {template!r} takes a string or a single user"
                            f" message, but the prompt is {len(roles)} message(s) with roles"
                            f" {roles}; use template 'chat' (or 'auto') to apply the tokenizer's"
                            f" chat template to the whole conversation")
        prompt = prompt[0]["content"]
    return template.format(prompt=prompt)


def tokenize_prompts(prompts: Sequence[Prompt], tokenizer: Any, template: str,
                     add_bos: bool = False, response_prefix: str = "") -> list[list[int]]:
    """Render and tokenize; special tokens come only from the rendered text (plus `add_bos`)."""
    texts = []
    for i, p in enumerate(prompts):
        try:
            texts.append(render_prompt(p, tokenizer, template, response_prefix))
        except DataError as e:
            raise DataError(f"record {i}: {e}") from e
    ids = list(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []
    if add_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise DataError(f"add_bos=True but tokenizer {_tokenizer_name(tokenizer)!r}"
                            f" has no bos token")
        # A chat template that already writes the BOS text must not get a second one.
        ids = [x if x and x[0] == bos else [bos, *x] for x in ids]
    return ids


# --- pipeline -----------------------------------------------------------------


class PromptPipeline:
    """Iterator of fixed-shape `PromptBatch`es over in-memory records, backed by Grain.

    mode="train": shuffled by `seed` (a new permutation every epoch), repeated
    `num_epochs` times (None = forever), sharded so hosts see disjoint prompts,
    last partial batch dropped. mode="eval": one pass in record order, every kept
    record exactly once over all hosts, final batch padded (`valid_n` False).
    Every host yields the same number of batches (multi-host collectives need it).
    """

    def __init__(
        self,
        records: Sequence[dict],
        tokenizer: Any,
        *,
        batch_size: int,
        max_prompt_len: int,
        template: str = "auto",
        add_bos: bool = False,
        pad_id: int | None = None,
        mode: Literal["train", "eval"] = "train",
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        on_overlong: Literal["drop", "error"] = "drop",
        response_prefix: str = "",
        shard_index: int | None = None,
        shard_count: int | None = None,
    ):
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
        _require(batch_size >= 1, "batch_size", batch_size, "an int >= 1")
        _require(max_prompt_len >= 1, "max_prompt_len", max_prompt_len, "an int >= 1")
        _require(mode in ("train", "eval"), "mode", mode, "'train' or 'eval'")
        _require(on_overlong in ("drop", "error"), "on_overlong", on_overlong, "'drop' or 'error'")
        _require(num_epochs is None or num_epochs >= 1, "num_epochs", num_epochs, "None or >= 1")
        _require(shard_count >= 1, "shard_count", shard_count, "an int >= 1")
        _require(0 <= shard_index < shard_count, "shard_index", shard_index,
                 f"in [0, {shard_count})")
        check_template(template)
        self.batch_size, self.max_prompt_len, self.mode = batch_size, max_prompt_len, mode
        self.shard_index, self.shard_count = shard_index, shard_count
        self.pad_id = _resolve_pad_id(tokenizer, pad_id)

        # Tokenize everything once: the drop count is known up front and the
        # Grain pipeline below only ever moves integers around.
        ids = tokenize_prompts([r["prompt"] for r in records], tokenizer, template, add_bos, response_prefix)
        length_r = np.array([len(x) for x in ids], np.int64)
        if (length_r == 0).any():
            raise DataError(f"record {int(np.argmax(length_r == 0))}: prompt renders to zero"
                            f" tokens with template {template!r}")
        over_r = length_r > max_prompt_len
        self.longest = _longest(length_r) if len(length_r) else "no records"
        if on_overlong == "error" and over_r.any():
            i = int(np.argmax(over_r))
            raise DataError(f"record {i}: prompt has {length_r[i]} tokens > max_prompt_len="
                            f"{max_prompt_len} ({int(over_r.sum())} records over; {self.longest};"
                            f" on_overlong='drop' skips them)")
        self.num_records = len(records)
        self.dropped_indices = np.flatnonzero(over_r)
        self.num_dropped = len(self.dropped_indices)
        self._record_k = np.flatnonzero(~over_r)
        self.num_kept = k = len(self._record_k)
        if self.num_records == 0:
            raise DataError("no prompts: the dataset has 0 records")
        if k == 0:
            raise DataError(f"no prompts left: all {self.num_records} records are longer than"
                            f" max_prompt_len={max_prompt_len} (shortest {int(length_r.min())}"
                            f" tokens; {self.longest}) with template {template!r}")
        self._length_k = length_r[self._record_k].astype(np.int32)
        self._offset_k = np.concatenate([[0], np.cumsum(self._length_k[:-1], dtype=np.int64)])
        self._flat = np.concatenate([np.asarray(ids[i], np.int32) for i in self._record_k])
        self._ground_truth_k = [records[i]["ground_truth"] for i in self._record_k]
        self._data_source_k = [records[i]["data_source"] for i in self._record_k]

        global_batch = batch_size * shard_count
        mine = slice(shard_index * batch_size, (shard_index + 1) * batch_size)
        collate_mine = lambda positions: self._collate(positions[mine])  # noqa: E731  (this host's block)
        if mode == "train":
            ds = grain.MapDataset.range(k)
            if shuffle:
                ds = ds.shuffle(seed=seed)  # reseeded per epoch by repeat()
            ds = ds.repeat(num_epochs)
            self.num_batches = None if num_epochs is None else k * num_epochs // global_batch
            if self.num_batches == 0:
                raise DataError(f"batch_size={batch_size} x {shard_count} shard(s) > {k} prompts x"
                                f" {num_epochs} epoch(s): no full batch")
            ds = ds.batch(global_batch, drop_remainder=True, batch_fn=collate_mine)
        else:
            self.num_batches = -(-k // global_batch)
            pos = np.full(self.num_batches * global_batch, -1, np.int64)
            pos[:k] = np.arange(k)
            ds = grain.MapDataset.source(pos.tolist()).batch(global_batch, batch_fn=collate_mine)
        # In-memory data: no reader threads (Grain's advice), so nothing runs ahead.
        self._iter = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                               prefetch_buffer_size=0)))
        # The global stream only: a state saved with H hosts restores on any other number of hosts.
        self._fingerprint = {
            "mode": mode, "seed": seed, "shuffle": shuffle, "num_epochs": num_epochs,
            "global_batch": global_batch, "max_prompt_len": max_prompt_len, "num_kept": k,
            "data_crc32": zlib.crc32(self._record_k.tobytes() + self._length_k.tobytes()),
        }

    def _collate(self, positions: Sequence[int]) -> PromptBatch:
        """Positions into the kept prompts (-1 = padding) -> left-padded batch."""
        pos_n = np.asarray(positions, np.int64)
        valid_n = pos_n >= 0
        src_n = np.where(valid_n, pos_n, 0)  # padding rows repeat kept prompt 0
        length_n = self._length_k[src_n]
        start_n = self.max_prompt_len - length_n
        col_p = np.arange(self.max_prompt_len)
        take_np = self._offset_k[src_n, None] + col_p[None, :] - start_n[:, None]
        tokens_np = np.where(col_p[None, :] >= start_n[:, None],
                             self._flat[np.clip(take_np, 0, len(self._flat) - 1)],
                             self.pad_id).astype(np.int32)
        return PromptBatch(
            tokens_np=tokens_np,
            length_n=length_n.astype(np.int32),
            ground_truth=[self._ground_truth_k[i] for i in src_n],
            data_source=[self._data_source_k[i] for i in src_n],
            record_index=np.where(valid_n, self._record_k[src_n], -1),
            valid_n=valid_n,
        )

    def __iter__(self) -> PromptPipeline:
        return self

    def __next__(self) -> PromptBatch:
        return next(self._iter)

    def get_state(self) -> dict:
        """JSON-serialisable position in the global stream: any host's state restores every host, on any
        number of hosts (the global batch, not the per-host one, must match)."""
        return {"grain": dict(self._iter.get_state()), "config": dict(self._fingerprint)}

    def set_state(self, state: dict) -> None:
        """Resume at `state` from `get_state()`; the pipeline must be configured the same."""
        try:
            saved, grain_state = dict(state["config"]), state["grain"]
        except (KeyError, TypeError) as e:
            raise DataError(f"not a PromptPipeline state: {state!r:.200}") from e
        if "global_batch" not in saved and "shard_count" in saved:  # saved before states were host-independent
            saved["global_batch"] = saved.pop("batch_size") * saved.pop("shard_count")
        diff = {key: (saved.get(key), now) for key, now in self._fingerprint.items()
                if saved.get(key) != now}
        if diff:
            raise DataError(f"data iterator state does not match this pipeline"
                            f" (key: (saved, now)): {diff}")
        self._iter.set_state(grain_state)


def _longest(length_r: np.ndarray) -> str:
    """Where the longest prompt is: the max_prompt_len that keeps every record."""
    i = int(np.argmax(length_r))
    return f"longest: record {i}, {int(length_r[i])} tokens"


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise DataError(f"PromptPipeline: {key}={value!r} is invalid; expected {allowed}")


def _resolve_pad_id(tokenizer: Any, pad_id: int | None) -> int:
    for candidate in (pad_id, getattr(tokenizer, "pad_token_id", None),
                      getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    raise DataError(f"tokenizer {_tokenizer_name(tokenizer)!r} has no pad or eos token;"
                    f" and no pad_id was given (models.tokenizer.pad_token_id picks one)")
