"""The memory planner: every phase of a run compiled ahead of time on abstract weights (memory.py), the
search for a setting that fits an accelerator (fit.py), and the printed plan (report.py). Its command
line is ``python -m echorl_jax.plan``."""
