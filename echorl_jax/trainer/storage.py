"""Run files where the run is: a local directory, or a bucket (``gs://...``) that every host of a pod sees.

``train.workdir`` may be a URL. Its files (``config.json``, ``metrics.jsonl``, TensorBoard events,
``report.md`` and plots, ``hf_export/``, the warm-start cache) then go through ``etils.epath``, the
path layer Orbax already uses for its own checkpoint files (``gs://`` needs ``gcsfs``, as for Orbax's
checkpoints on GCS). Process 0 writes them; a pod restarted on new VMs finds them there and resumes.

Objects in a bucket cannot be appended to: a remote ``metrics.jsonl`` is rewritten whole when flushed
(``MetricsLog`` flushes every ``REMOTE_FLUSH_S`` seconds and before every checkpoint), and directories
that libraries write locally (the HF export, the tokenizer, plots) are written to a temporary local
directory and uploaded (``local_dir_for``).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from typing import Iterator

REMOTE_FLUSH_S = 30.0


def is_remote(path: str) -> bool:
    return "://" in str(path)


def _epath(path: str):
    from etils import epath

    return epath.Path(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(str(base), *parts) if is_remote(base) else os.path.join(base, *parts)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
    if not isdir(path):
        return []
    return sorted(p.name for p in _epath(path).iterdir()) if is_remote(path) else sorted(os.listdir(path))


def makedirs(path: str) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str | None:
    """The file's text, or None when it does not exist."""
    if not exists(path):
        return None
    if is_remote(path):
        return _epath(path).read_text()
    with open(path) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    """Writes the whole file (a remote object is replaced in one write)."""
    write_bytes(path, text.encode())


def write_bytes(path: str, data: bytes) -> None:
    parent = posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)
    if parent:
        makedirs(parent)
    if is_remote(path):
        _epath(path).write_bytes(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


def move(src: str, dst: str) -> None:
    if is_remote(src):
        _epath(src).rename(dst)
    else:
        shutil.move(src, dst)


def upload_dir(local: str, remote: str) -> None:
    """Copies the tree under ``local`` to ``remote`` (files replaced)."""
    for root, _, files in os.walk(local):
        rel = os.path.relpath(root, local)
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                write_bytes(join(remote, *([] if rel == "." else rel.split(os.sep)), name), f.read())


def download_dir(remote: str, local: str) -> None:
    """Copies the tree under ``remote`` into the local directory ``local``."""
    os.makedirs(local, exist_ok=True)
    for p in _epath(remote).iterdir():
        if p.is_dir():
            download_dir(str(p), os.path.join(local, p.name))
        else:
            with open(os.path.join(local, p.name), "wb") as f:
                f.write(p.read_bytes())


@contextlib.contextmanager
def local_dir_for(path: str, upload: bool = True) -> Iterator[str]:
    """A local directory to write ``path``'s files into: ``path`` itself when local; else a temporary one
    uploaded to ``path`` on exit (when ``upload``: the process that writes) and deleted."""
    if not is_remote(path):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="echorl-upload-")
    try:
        out = os.path.join(tmp, "d")
        yield out
        if upload and os.path.isdir(out):
            upload_dir(out, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _RemoteEventFile:
    """A TensorBoard event file in a bucket: bytes kept in memory, the object rewritten on flush."""

    def __init__(self, path: str):
        self.path, self.data = path, bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def flush(self) -> None:
        write_bytes(self.path, bytes(self.data))

    def close(self) -> None:
        self.flush()


class _RemoteEventFactory:
    def open(self, path: str) -> _RemoteEventFile:
        return _RemoteEventFile(path)

    def directory_check(self, path: str) -> None:
        makedirs(path)


def tensorboard_writer(logdir: str):
    """tensorboardX's SummaryWriter for ``logdir``; a remote one writes through epath (tensorboardX's own
    gs:// writer needs google-cloud-storage)."""
    from tensorboardX import SummaryWriter

    if is_remote(logdir):
        from tensorboardX import record_writer

        record_writer.register_writer_factory(logdir.split("://")[0], _RemoteEventFactory())
    return SummaryWriter(logdir)
