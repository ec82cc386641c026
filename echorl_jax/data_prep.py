"""``python -m echorl_jax.data_prep``: Hugging Face exports -> verl parquet (the code is in ``data/prep.py``)."""

import sys

from echorl_jax.cli import run_tool

if __name__ == "__main__":
    sys.exit(run_tool("data_prep", sys.argv[1:]))
