"""``python -m echorl_jax TOOL ARGS`` (the same as ``echorl-jax TOOL ARGS``): see ``cli.py``."""

import sys

from echorl_jax.cli import dispatch

sys.exit(dispatch())
