"""``python -m echorl_jax.analyze_steps``: step-entropy analysis of verified solutions (the code is in ``evaluation/step_entropy.py``)."""

import sys

from echorl_jax.cli import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("analyze_steps", sys.argv[1:]))
