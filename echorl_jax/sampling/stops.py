"""Stop handling: stop ids and stop sequences, as host tables and an in-loop match.

``stop_ids`` entries are token ids or token-id sequences. Single ids
are checked with one ``isin`` per step. Multi-token sequences are a padded
``[S, L]`` constant (right-aligned, -1 = wildcard); each row carries its last
L generated tokens and is done when they end with any sequence. The response
mask covers the whole stop sequence and nothing after; ``stop_len`` says how
many trailing tokens it has, so ``decode_responses`` can leave it out.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def split_stops(stops) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """``stop_ids`` entries (an id or a sequence of ids) -> (single ids, multi-token sequences)."""
    single, multi = [], []
    for entry in stops:
        seq = (int(entry),) if isinstance(entry, (int, np.integer)) else tuple(int(i) for i in entry)
        if not seq:
            raise ValueError("stop_ids: an empty stop sequence would stop every row at once")
        (single if len(seq) == 1 else multi).append(seq[0] if len(seq) == 1 else seq)
    return tuple(dict.fromkeys(single)), tuple(dict.fromkeys(multi))


def stop_sequence_table(seqs) -> tuple[np.ndarray, np.ndarray]:
    """Sequences -> (ids [S, L] int32 right-aligned, -1 before a shorter one; lengths [S] int32)."""
    width = max((len(q) for q in seqs), default=0)
    ids_sl = np.full((len(seqs), width), -1, np.int32)
    for i, q in enumerate(seqs):
        ids_sl[i, width - len(q) :] = q
    return ids_sl, np.asarray([len(q) for q in seqs], np.int32)


def ends_with_stop(hist_bl, ids_sl, len_s):
    """Longest stop sequence each row's history ends with ([B] int32, 0 = none).

    ``hist_bl`` holds the last L tokens (oldest first); ``ids_sl`` is ``stop_sequence_table``'s.
    """
    match_bs = jnp.all((hist_bl[:, None, :] == ids_sl[None]) | (ids_sl[None] < 0), axis=-1)
    return jnp.max(jnp.where(match_bs, len_s[None], 0), axis=-1, initial=0)


def as_ids(x) -> tuple[int, ...]:
    """An id, a list of ids or None (a tokenizer's ``eos_token_id``) -> a tuple of ids."""
    if x is None:
        return ()
    return tuple(int(i) for i in (x if isinstance(x, (list, tuple)) else [x]))


def as_stops(stops) -> tuple:
    """Hashable stop entries: ints stay ints, sequences become tuples."""
    return tuple(int(s) if isinstance(s, (int, np.integer)) else tuple(int(i) for i in s) for s in stops)
