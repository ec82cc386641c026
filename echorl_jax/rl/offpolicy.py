"""LUFFY's mixed groups: ``k`` expert responses from the dataset beside ``G - k`` rollouts.

Layout (rows group-major, ``b = n*G + g``): the sampler draws ``G - k`` rollouts per
prompt and ``mix_expert_rows`` appends the prompt's ``k`` expert rows, so rows with
``g >= G - k`` are expert rows (``expert_rows``) and every shape stays fixed.

An expert row holds the prompt exactly as its group's rollouts do, then the expert
response tokenized without special tokens, then one stop token (the chat template's
end of turn for chat prompts, else the eos: the row ends like a finished rollout and
its text decodes without the stop). Its ``behaviour_logp`` is 0 (behaviour probability
1, as LUFFY takes it) and its ``entropy`` is 0: the sampler has no entropy for tokens it
did not draw, so expert rows are never EchoClip sources (docs/objectives.md says why).
It is verified like any rollout; its reward enters the group's advantage.

Expert text: the record field ``data.expert_key`` ("" = the first present of
``EXPERT_KEYS``): a string, a list of strings (the k rows take traces ``j mod len``),
or a chat message list whose last message is the assistant's (LUFFY's ``target``
column). An expert response longer than ``T`` tokens with the stop is, by default
(``data.expert_overlong='truncate'``, as LUFFY's script), cut to its first ``T`` tokens with
no stop: a truncated row like a rollout that ran out of room (``truncated``, no stop).
``'drop'`` drops such records at start-up (counted in the log), ``'error'`` refuses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from echorl_jax import sharding
from echorl_jax.data.formats import DataError
from echorl_jax.sampling.sampler import Rollout

EXPERT_KEYS = ("expert", "target", "solution")


def expert_rows(num_rows: int, group_size: int, k: int) -> np.ndarray:
    """bool ``[B]``: row ``b = n*G + g`` is an expert row (``g >= G - k``)."""
    return (np.arange(num_rows) % group_size) >= group_size - k


def expert_key(record: dict, given: str) -> str | None:
    """The record's expert field: ``given``, or the first of ``EXPERT_KEYS`` it has (None: none)."""
    if given:
        return given if given in record else None
    return next((key for key in EXPERT_KEYS if record.get(key) is not None), None)


def expert_texts(value: Any) -> list[str] | None:
    """The expert traces in a field value, or None when it holds none."""
    if isinstance(value, str):
        return [value] if value else None
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, str) and v for v in value):
            return list(value)
        last = value[-1]
        if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str):
            return [last["content"]] if last["content"] else None
    return None


def check_expert_records(records: Sequence[dict], given_key: str, source: str, why: str) -> None:
    """Every record of ``source`` carries an expert trace, else DataError naming the row and column."""
    wanted = repr(given_key) if given_key else " or ".join(map(repr, EXPERT_KEYS))
    for i, r in enumerate(records):
        key = expert_key(r, given_key)
        if key is None or expert_texts(r[key]) is None:
            got = f"{key!r} is {r[key]!r:.120}" if key else f"row has keys {sorted(r)}"
            raise DataError(
                f"{source}, row {i}: {why} needs an expert response in column {wanted} (a non-empty string, a list "
                f"of strings, or chat messages ending with the assistant's); {got}; set data.expert_key to name it"
            )


class ExpertTraces:
    """Expert responses of the train records, tokenized per step for the prompts drawn.

    Only the texts are kept (the records hold them anyway); ``lengths`` of every trace are
    measured once at start-up, which is what decides the drops.
    """

    def __init__(self, records: Sequence[dict], tokenizer, *, key: str, k: int, max_new_tokens: int,
                 stop_id: int, pad_id: int, response_prefix: str = ""):  # fmt: skip
        self.tokenizer, self.k, self.t, self.stop_id, self.pad_id = tokenizer, k, max_new_tokens, stop_id, pad_id
        self.texts = [expert_texts(r[expert_key(r, key)]) for r in records]
        if response_prefix:  # the prompt already opens the turn with it (data.response_prefix), as LUFFY strips "<think>\n"
            self.texts = [[t.removeprefix(response_prefix) for t in traces] for traces in self.texts]
        self.texts = [[traces[j % len(traces)] for j in range(k)] for traces in self.texts]
        flat = [t for traces in self.texts for t in traces]
        ids = list(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else []
        self.length_rk = np.asarray([len(x) + 1 for x in ids], np.int64).reshape(len(records), k)  # + stop

    def too_long(self) -> np.ndarray:
        """bool ``[R]``: a trace of the record does not fit in ``T`` tokens with its stop."""
        return (self.length_rk > self.t).any(axis=1)

    def subset(self, keep_r: np.ndarray) -> "ExpertTraces":
        out = object.__new__(ExpertTraces)
        out.__dict__.update(self.__dict__)
        out.texts = [t for t, ok in zip(self.texts, keep_r) if ok]
        out.length_rk = self.length_rk[np.asarray(keep_r, bool)]
        return out

    def rows(self, record_index_n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens_nkt int32 padded with pad_id, length_nk int32)`` for the records of a batch; a trace
        longer than ``T`` with its stop keeps its first ``T`` tokens and no stop (``truncated``)."""
        n = len(record_index_n)
        texts = [t for i in record_index_n for t in self.texts[int(i)]]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        tokens = np.full((n * self.k, self.t), self.pad_id, np.int32)
        lengths = np.zeros(n * self.k, np.int32)
        for row, x in enumerate(ids):
            x = [*x, self.stop_id][: self.t]
            tokens[row, : len(x)] = x
            lengths[row] = len(x)
        return tokens.reshape(n, self.k, self.t), lengths.reshape(n, self.k)

    def truncated(self, record_index_n: np.ndarray) -> np.ndarray:
        """bool ``[N, k]``: the batch's expert rows that ``rows`` cut (no stop token)."""
        return self.length_rk[np.asarray(record_index_n, np.int64)] > self.t

    def add_to(self, rollout: Rollout, batch) -> Rollout:
        """``rollout`` ([N*(G-k)] rows) with the batch's expert rows appended to each group ([N*G]).

        Multi-process: ``rollout`` holds every process's prompts (the sampler gathers them) and ``batch``
        this process's, so the record indices of all processes are gathered first, in process order."""
        record_index_n = sharding.gather_rows(np.asarray(batch.record_index))
        tokens_nkt, length_nk = self.rows(record_index_n)
        truncated_nk = self.truncated(record_index_n)
        return mix_expert_rows(rollout, jnp.asarray(tokens_nkt), jnp.asarray(length_nk), jnp.asarray(truncated_nk))


@jax.jit
def mix_expert_rows(rollout: Rollout, expert_tokens_nkt: jax.Array, expert_len_nk: jax.Array,
                    expert_truncated_nk: jax.Array | None = None) -> Rollout:  # fmt: skip
    """Group-major rows ``[N*G]``: each group's ``G - k`` sampled rows, then its ``k`` expert rows.

    ``expert_tokens_nkt`` holds each response + stop token, padded; ``expert_len_nk`` its length;
    ``expert_truncated_nk`` (None = none) the rows cut at ``T`` without their stop.
    """
    n, k, t = expert_tokens_nkt.shape
    cut_nk = jnp.zeros((n, k), bool) if expert_truncated_nk is None else expert_truncated_nk.astype(bool)
    s = rollout.tokens.shape[1]
    p = s - t

    def groups(x):  # [N*(G-k), ...] -> [N, G-k, ...]
        return x.reshape(n, -1, *x.shape[1:])

    def mix(on, expert):  # [N*(G-k), ...] + [N, k, ...] -> [N*G, ...]
        out = jnp.concatenate([groups(on), expert.astype(on.dtype)], axis=1)
        return out.reshape(-1, *on.shape[1:])

    first = lambda x: jnp.broadcast_to(groups(x)[:, :1], (n, k, *x.shape[1:]))  # the group's prompt
    mask_nkt = jnp.arange(t)[None, None, :] < expert_len_nk[..., None]
    tokens = jnp.concatenate([first(rollout.tokens[:, :p]), expert_tokens_nkt.astype(rollout.tokens.dtype)], axis=2)
    valid = jnp.concatenate([first(rollout.valid[:, :p]), mask_nkt], axis=2)
    zeros = jnp.zeros((n, k, t), jnp.float32)
    stop_len = rollout.stop_len if rollout.stop_len is not None else (~rollout.truncated).astype(jnp.int32)
    return Rollout(
        tokens=mix(rollout.tokens, tokens),
        valid=mix(rollout.valid, valid),
        response_mask=mix(rollout.response_mask, mask_nkt),
        behaviour_logp=mix(rollout.behaviour_logp, zeros),  # behaviour probability 1
        entropy=mix(rollout.entropy, zeros),  # not sampled: no entropy (never an EchoClip source)
        lengths=mix(rollout.lengths, expert_len_nk),
        truncated=mix(rollout.truncated, cut_nk),
        stop_len=mix(stop_len, (~cut_nk).astype(jnp.int32)),
    )




def mix_versions(version_bt: jax.Array, mask_bt: jax.Array, num_groups: int, group_size: int) -> jax.Array:
    """int32 ``[N*G, T]`` version tags laid out like ``mix_expert_rows``'s rows (N = ``num_groups``, G =
    ``group_size``): each group's ``G - k`` sampled rows keep theirs (``version_bt``, ``mask_bt``: those rows,
    ``[N*(G-k), T]``), its ``k`` expert rows (drawn by no policy) take the group's oldest sampled token's, so a
    staleness bound keeps or drops a group whole."""
    on_nkt = version_bt.reshape(num_groups, -1, version_bt.shape[1])
    big = jnp.iinfo(jnp.int32).max
    oldest_n = jnp.min(jnp.where(mask_bt.reshape(on_nkt.shape), on_nkt, big), axis=(1, 2))
    oldest_n = jnp.where(oldest_n == big, jnp.max(on_nkt, axis=(1, 2)), oldest_n)  # no sampled token: any tag
    k = group_size - on_nkt.shape[1]
    expert = jnp.broadcast_to(oldest_n[:, None, None], (num_groups, k, on_nkt.shape[2])).astype(jnp.int32)
    return jnp.concatenate([on_nkt.astype(jnp.int32), expert], axis=1).reshape(num_groups * group_size, -1)
