"""How a learner batch's tokens group into sequences: one row each (padded) or many per row (packed).

The losses (rl/objectives.py, rl/echo.py) reduce some per-token values over a whole
sequence: a sequence's token count (``seq-mean-token-mean``), GSPO's mean log-ratio,
an EchoClip's length. In the padded layout ``[B, T]`` a sequence is a row, so that is
``x.sum(axis=1)``. In the packed layout (rl/packing.py) a row ``[R, L]`` holds several
sequences, each a contiguous segment, and every token knows which rollout row it came
from (``seq_bt``); the same reduction is a segment sum over those indices.

A layout has three operations, so every loss is written once for both:

* ``seq_sum(x_bt) -> x_s``: per-sequence sums (padded: ``[B]``; packed: ``[num_seqs]``,
  zero for a sequence that has no token in this batch);
* ``to_tokens(x_s) -> x_bt``: each token's sequence value, broadcastable to ``x_bt``;
* ``response_len(x_bt)``: T, the unpacked response length (Dr.GRPO's constant divisor).

``ROWS`` is the padded layout and the default everywhere, so unpacked callers see the
same operations, in the same order, as before packing existed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


class Rows:
    """Padded layout: row ``b`` of a ``[B, T]`` array is sequence ``b``."""

    def seq_sum(self, x_bt: jax.Array) -> jax.Array:
        return x_bt.sum(axis=1)

    def to_tokens(self, x_s: jax.Array) -> jax.Array:
        return x_s[:, None]

    def response_len(self, x_bt: jax.Array) -> int:
        return x_bt.shape[1]


ROWS = Rows()


@dataclasses.dataclass(frozen=True)
class Segments:
    """Packed layout: token ``(r, l)`` belongs to sequence ``seq_bt[r, l]`` (its rollout row in the
    mini-batch); padding carries ``num_seqs``, which no reduction counts.

    Built inside a traced function (its ``seq_bt`` is a tracer); ``num_seqs`` and
    ``num_response`` are static ints.
    """

    seq_bt: jax.Array  # int32 [R, L]
    num_seqs: int  # rollout rows the indices refer to (the mini-batch's B)
    num_response: int  # T of the unpacked rows

    def seq_sum(self, x_bt: jax.Array) -> jax.Array:
        if x_bt.dtype == jnp.bool_:
            x_bt = x_bt.astype(jnp.int32)
        # Padding's index num_seqs is out of range: segment_sum drops it.
        return jax.ops.segment_sum(x_bt.reshape(-1), self.seq_bt.reshape(-1), num_segments=self.num_seqs)

    def to_tokens(self, x_s: jax.Array) -> jax.Array:
        return jnp.take(x_s, self.seq_bt, mode="fill", fill_value=0)

    def response_len(self, x_bt: jax.Array) -> int:
        return self.num_response
