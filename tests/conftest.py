"""Tests run on CPU with 8 fake devices so real meshes are exercised."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    flags += " --xla_force_host_platform_device_count=8"
# The tests' programs are tiny: compiling them costs more than running them, and LLVM's -O0 compiles XLA:CPU
# code about twice as fast (the README test command 40 % faster from a cold cache). Same XLA programs, same
# semantics; float results may differ from optimised code in the last bits, which every tolerance allows.
# The default run and bench/ keep XLA's default level.
if "xla_backend_optimization_level" not in flags:
    flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = flags.strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Many tests build the same tiny programs: a persistent compilation cache skips repeated XLA compiles.
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
