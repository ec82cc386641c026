"""Tests run on CPU with 8 fake devices so real meshes are exercised."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
from xla_flags import with_fast_compile  # noqa: E402  (LLVM -O0 and the older emitters: tests/xla_flags.py)

os.environ["XLA_FLAGS"] = with_fast_compile(flags)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Many tests build the same tiny programs: a persistent compilation cache skips repeated XLA compiles.
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
