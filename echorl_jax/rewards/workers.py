"""Killable worker processes: each item runs with a wall-clock limit; on expiry its worker is SIGKILLed and
replaced, so a verifier that hangs (in Python or inside C code, where no signal reaches it) costs one item.

Workers are plain ``python -c`` subprocesses rather than multiprocessing "spawn" children (spawn re-imports
the trainer's ``__main__``: jax, transformers, in every worker). The trainer sends each worker its init
message and then ``(index, *task)`` tuples (pickled: the trainer is the trusted side); workers answer with
JSON, never pickle, so a compromised worker cannot hand the trainer code to run. Used by the math verifier
(``math.py``) and by the user's custom reward function (``custom.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import weakref
from collections import deque
from multiprocessing import Pipe, connection as mp_connection
from typing import Any, Callable

TIMEOUT = "timeout"


class Failed(str):
    """The result of an item whose worker raised (the text says what) or died; not a worker's answer."""


def serve(fd: int, handle: Callable[[Any], Any], init: Callable[[Any], None] | None = None) -> None:
    """A worker's main loop: ``init(message)`` once, then ``handle(task)`` per item, answered as JSON.
    An exception answers ``Failed("Type: message")``; the worker keeps serving."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    conn = mp_connection.Connection(fd)
    message = conn.recv()  # from the trainer: trusted
    if init is not None:
        init(message)
    conn.send_bytes(b'"ready"')
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the trainer went away
            return
        if msg is None:
            return
        idx, *task = msg
        try:
            out, error = handle(task), None
        except Exception as e:  # noqa: BLE001  (MemoryError, RecursionError, the user's own errors ...)
            out, error = None, f"{type(e).__name__}: {e}"[:1000]
        conn.send_bytes(json.dumps([idx, out, error]).encode())


class _Worker:
    """One worker subprocess. ``item`` is the batch index it is working on, if any."""

    def __init__(self, entry: str, init_msg: Any, startup_timeout_s: float):
        parent, child = Pipe()
        module, fn = entry.split(":")
        code = f"from {module} import {fn}; {fn}({child.fileno()})"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.popen = subprocess.Popen(
            [sys.executable, "-c", code],
            pass_fds=(child.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self.conn = parent
        self.conn.send(init_msg)
        self.ready = False
        self.item: int | None = None
        self.deadline = time.monotonic() + startup_timeout_s

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self.conn.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except OSError:
            pass
    for w in workers:
        try:
            w.popen.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            pass
        w.kill()
    workers.clear()


class WorkerPool:
    """``num_workers`` processes running ``entry`` ("module:function", the function calls ``serve``).

    ``run(tasks)`` returns one result per task: the worker's answer, ``TIMEOUT`` (killed after ``timeout_s``)
    or a ``Failed`` (it raised, or its process died). ``name`` names the pool in start-up errors."""

    def __init__(self, entry: str, init_msg: Any, *, num_workers: int, timeout_s: float, name: str,
                 startup_timeout_s: float = 120.0):  # fmt: skip
        self.entry, self.init_msg, self.name = entry, init_msg, name
        self.timeout_s, self.startup_timeout_s = float(timeout_s), float(startup_timeout_s)
        self.workers: list[_Worker] = [self._start() for _ in range(num_workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self.workers)

    def _start(self) -> _Worker:
        return _Worker(self.entry, self.init_msg, self.startup_timeout_s)

    def _replace(self, k: int) -> None:
        self.workers[k].kill()
        self.workers[k] = self._start()

    def run(self, tasks: list[tuple]) -> list:
        if not self.workers:
            raise RuntimeError(f"{self.name} is closed")
        results: list = [None] * len(tasks)
        todo = deque(range(len(tasks)))
        while todo or any(w.item is not None for w in self.workers):
            for k, w in enumerate(self.workers):
                if w.ready and w.item is None and todo:
                    if w.popen.poll() is not None:  # died while idle (e.g. OOM killer)
                        self._replace(k)
                        continue
                    i = todo.popleft()
                    try:
                        w.conn.send((i, *tasks[i]))
                    except OSError:  # died just now: not the item's fault
                        todo.appendleft(i)
                        self._replace(k)
                        continue
                    w.item, w.deadline = i, time.monotonic() + self.timeout_s
            waiting = [w for w in self.workers if not w.ready or w.item is not None]
            wait_s = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            readable = mp_connection.wait([w.conn for w in waiting], timeout=wait_s)
            now = time.monotonic()
            for k, w in enumerate(self.workers):
                if w not in waiting:
                    continue
                if w.conn in readable:
                    try:
                        msg = json.loads(w.conn.recv_bytes(maxlength=1 << 16))
                    except (EOFError, OSError, ValueError):
                        if not w.ready:
                            raise RuntimeError(f"{self.name} worker failed to start (see its stderr above)") from None
                        results[w.item] = Failed("the worker process died")
                        self._replace(k)
                        continue
                    if not w.ready:
                        w.ready = True
                    else:
                        idx, out, error = msg
                        assert idx == w.item, (idx, w.item)
                        results[idx] = Failed(error) if error is not None else out
                        w.item = None
                elif now >= w.deadline:
                    if not w.ready:
                        raise RuntimeError(f"{self.name} worker did not start within {self.startup_timeout_s}s")
                    results[w.item] = TIMEOUT
                    self._replace(k)
        return results

    def close(self) -> None:
        self._finalizer()
