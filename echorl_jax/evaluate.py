"""``python -m echorl_jax.evaluate``: benchmark evaluation (the code is in ``evaluation/benchmark.py``)."""

import sys

from echorl_jax.cli import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("evaluate", sys.argv[1:]))
