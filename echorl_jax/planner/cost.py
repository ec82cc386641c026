"""Flops and bytes of a compiled program per device, with its loops counted as often as they run.

``compiled.cost_analysis()`` (XLA's HloCostAnalysis; JAX 0.10 returns one dict) is per device for an
SPMD program, but it counts the body of every ``while`` loop once, whatever its trip count: a
``lax.scan`` over 28 layers reports one layer, the micro-batch scan one micro-batch, the log-prob
chunk scan one chunk (a ``fori_loop`` of 10 matmuls reports 1). ``loop_flops`` corrects that from the
optimized HLO: every loop whose trip count XLA knows (``known_trip_count``: scans, fori loops) is
counted that many times, nested loops multiplied, by running XLA's own cost analysis on each loop
body as a module of its own. Loops XLA cannot count (a ``while_loop`` that exits on data, such as the
sampler's decode loops) are counted ``unknown`` times (default 0: left out, for the caller to add).
A ``cond`` counts as its most expensive branch (XLA's rule): a packed micro-batch scan is counted as if
every micro-batch held rows, the most it can do.

Bytes are not taken from the same analysis: scaled the same way, XLA:CPU's ``bytes accessed`` counts a
fusion that reads a slice of, or updates in place, a layer-stacked buffer as the whole buffer in every
iteration (48 GB per layer per micro-batch for a 7B train step, whose layer's weights are 0.5 GB), and a
bf16 dot as its f32 upcasts. ``program_cost`` takes as the memory traffic a floor that holds on any
backend: every buffer of the program (arguments, outputs, temporaries: ``memory_analysis``) touched once.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

_HEAD = re.compile(r"^(ENTRY )?%([\w.\-]+) ")
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_WHILE = re.compile(r" while\(.*?condition=%([\w.\-]+), body=%([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


class Cost(NamedTuple):
    """Per device: floating-point operations and bytes of memory traffic."""

    flops: float = 0.0
    bytes: float = 0.0


class _Module(NamedTuple):
    preamble: list  # the module's header and metadata tables (stack frames the instructions name)
    blocks: dict  # computation name -> its lines
    order: list  # computation names as printed (callees before callers)
    entry: str
    calls: dict  # computation -> computations it calls, loops excepted
    loops: dict  # computation -> [(condition, body, trip count or None)] of its while instructions


def _parse(text: str) -> _Module:
    preamble, blocks, order, entry, current = [], {}, [], "", None
    for line in text.splitlines():
        if current is None:
            m = _HEAD.match(line)
            if m and line.rstrip().endswith("{"):
                current = m.group(2)
                order.append(current)
                blocks[current] = [line]
                entry = current if m.group(1) else entry
            elif not order:
                preamble.append(line)
            continue
        blocks[current].append(line)
        if line == "}":
            current = None
    calls, loops = {}, {}
    for name, lines in blocks.items():
        callees, whiles = set(), []
        for line in lines[1:]:
            m = _WHILE.search(line)
            if m:
                trip = _TRIP.search(line)
                whiles.append((m.group(1), m.group(2), int(trip.group(1)) if trip else None))
                continue
            callees.update(_CALLS.findall(line))
            for group in _BRANCHES.findall(line):
                callees.update(x.strip().lstrip("%") for x in group.split(","))
        calls[name], loops[name] = callees, whiles
    return _Module(preamble, blocks, order, entry, calls, loops)


def program_cost(compiled, unknown: float = 0.0) -> Cost:
    """Per device: ``loop_flops`` and, as bytes, every buffer of the program touched once (a floor)."""
    mem = compiled.memory_analysis()
    touched = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return Cost(loop_flops(compiled, unknown), float(touched))


def loop_flops(compiled, unknown: float = 0.0) -> float:
    """Per-device flops of ``compiled`` (a ``jax.stages.Compiled``), every loop counted as often as it runs;
    loops without a known trip count ``unknown`` times."""
    import jax
    from jax._src.lib import _jax
    from jaxlib import _hlo

    mod = _parse(compiled.as_text())
    client = jax.devices()[0].client
    header = "\n".join(["HloModule part", *mod.preamble[1:]])

    def reachable(root: str) -> set:
        seen, todo = set(), [root]
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.add(c)
                todo += mod.calls[c]
                todo += [x for cond, body, _ in mod.loops[c] for x in (cond, body)]
        return seen

    @functools.lru_cache(maxsize=None)
    def xla(root: str) -> float:
        """XLA's own count for ``root`` as a module's entry (each loop body once)."""
        if root == mod.entry:
            got = compiled.cost_analysis()
        else:
            keep = reachable(root)
            parts = []
            for c in mod.order:
                if c in keep:
                    first = re.sub(r"^ENTRY ", "", mod.blocks[c][0])
                    parts.append("\n".join([("ENTRY " if c == root else "") + first, *mod.blocks[c][1:]]))
            got = _jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(header + "\n\n" + "\n\n".join(parts)))
        got = got[0] if isinstance(got, (list, tuple)) else got  # older JAX: a list of one dict per program
        return float(got.get("flops", 0.0))

    def loops_under(c: str) -> list:
        """The loops in ``c`` and in what it calls, not looking inside loop bodies."""
        out, seen, todo = [], set(), [c]
        while todo:
            x = todo.pop()
            if x not in seen:
                seen.add(x)
                out += mod.loops[x]
                todo += mod.calls[x]
        return out

    @functools.lru_cache(maxsize=None)
    def counted(c: str) -> float:
        """``c``'s flops with each loop body (counted once by XLA) counted trip-count times."""
        flops = xla(c)
        for _, body, trips in loops_under(c):
            flops += (unknown if trips is None else trips) * counted(body) - xla(body)
        return flops

    return counted(mod.entry)
