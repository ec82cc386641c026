"""The XLA flags the tests compile with: the tests' programs are tiny, so compiling them costs more than running
them. The default run and bench/ keep XLA's defaults.

* LLVM ``-O0`` (``--xla_backend_optimization_level=0``) compiles XLA:CPU code about twice as fast.
* XLA:CPU's older elemental emitters (``--xla_cpu_use_fusion_emitters=false``) compile a tiny model's sampler
  in 0.55 s instead of 1.23 s and the test suite in about 40 % less CPU time (measured on the 2-core Xeon);
  XLA's own switch between two code generators for the same HLO fusions. Only set where this jaxlib knows the
  flag (XLA aborts on an unknown one).

A run whose time is executing (hundreds of steps, or a model of tens of millions of parameters) is faster
with LLVM's optimiser: ``llvm_optimised`` drops ``-O0`` from a subprocess's flags (the shortened default run
76 -> 54 s, the shrunk ``evidence_large`` run 79 -> 54 s).

Same XLA programs, same semantics; float results may differ from optimised code in the last bits, which every
tolerance allows (a test that compares two runs compiles both with these flags).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import mmap
import os


@functools.cache
def _jaxlib_knows(flag: str) -> bool:
    spec = importlib.util.find_spec("jaxlib")  # not imported: XLA reads XLA_FLAGS once, so set them first
    for path in glob.glob(os.path.join(spec.submodule_search_locations[0], "**", "*.so"), recursive=True):
        if os.path.getsize(path):  # an empty file cannot be mapped
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                if m.find(flag.encode()) >= 0:
                    return True
    return False


def fast_compile_flags() -> str:
    flags = "--xla_backend_optimization_level=0"
    if _jaxlib_knows("xla_cpu_use_fusion_emitters"):
        flags += " --xla_cpu_use_fusion_emitters=false"
    return flags


def with_fast_compile(flags: str) -> str:
    """``flags`` (an XLA_FLAGS value) plus those of ``fast_compile_flags`` it does not set itself."""
    for flag in fast_compile_flags().split():
        if flag.split("=")[0] not in flags:
            flags += " " + flag
    return flags.strip()


def llvm_optimised(flags: str) -> str:
    """``flags`` without LLVM ``-O0``: for a subprocess whose time is executing rather than compiling."""
    return " ".join(f for f in flags.split() if not f.startswith("--xla_backend_optimization_level"))
