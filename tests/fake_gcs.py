"""A local stand-in for Google Cloud Storage: ``gs://BUCKET/KEY`` is ``$FAKE_GCS_ROOT/BUCKET/KEY``.

``install(root)`` registers it as fsspec's ``gs``/``gcs`` filesystem, which is what ``etils.epath`` (the path
layer Orbax and ``trainer/storage.py`` use) opens for ``gs://`` paths when TensorFlow is absent. Nothing reaches
the network. TensorStore (Orbax's array writer) has its own GCS driver that this does not replace: tests keep
``train.checkpoint_dir`` local. In a subprocess: ``PRELUDE`` (with ``FAKE_GCS_ROOT`` set) installs it.
"""

from __future__ import annotations

import os

import fsspec
from fsspec.implementations.local import LocalFileSystem

PRELUDE = "import fake_gcs; fake_gcs.install(os.environ['FAKE_GCS_ROOT'])"


class FakeGCS(LocalFileSystem):
    protocol = ("gs", "gcs")
    root = ""

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # gcsfs's argument, which epath passes
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ("gs://", "gcs://"):
            if path.startswith(prefix):
                return os.path.join(cls.root, path[len(prefix) :]).rstrip("/")
        return super()._strip_protocol(path)


def _clear_epath_cache() -> None:
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()


def install(root: str) -> None:
    FakeGCS.root = os.fspath(root)
    for proto in FakeGCS.protocol:
        fsspec.register_implementation(proto, FakeGCS, clobber=True)
    _clear_epath_cache()


def uninstall() -> None:
    import importlib

    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is also a mapping)
    for proto in FakeGCS.protocol:
        registry._registry.pop(proto, None)
    _clear_epath_cache()
