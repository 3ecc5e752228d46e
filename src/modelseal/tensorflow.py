"""``modelseal.tensorflow``: TensorFlow SavedModels from sealed artifacts, from memory only.

A SavedModel is a directory; sealed, it is a sealed directory or a bundle of the directory. Its files
are decrypted into our buffers, written into TensorFlow's in-memory ``ram://`` filesystem, loaded from
there and removed from it right after; our buffers are wiped. Nothing reaches a disk.

TensorFlow makes copies we cannot wipe: ``GFile.write`` takes only ``bytes`` (a ``bytearray`` is copied
into one), so each file passes through it in 1 MiB ``bytes`` chunks, freed as soon as written; the
``ram://`` file is TensorFlow's own copy, freed by ``rmtree``; the loaded variables are TensorFlow's.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from modelseal.crypto import keys
from modelseal.errors import MissingDependencyError, UsageError
from modelseal.load.bundles import read_all
from modelseal.recipients.registry import IdentitySpec

CHUNK = 1 << 20  # the most of a decrypted file that exists as an immutable bytes object at a time


def _tensorflow() -> Any:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise MissingDependencyError("this needs TensorFlow: pip install 'modelseal[tensorflow]'") from None
    return tf


def load_saved_model(
    path: str | os.PathLike[str],
    *,
    identity: IdentitySpec | None = None,
    trusted_signers: Sequence[str] | None = None,
) -> Any:
    """``tf.saved_model.load`` of a sealed SavedModel (a sealed directory or a bundle of one)."""
    files = read_all(Path(path), identity=identity, trusted_signers=trusted_signers)
    try:
        return saved_model_from_files(files, str(path))
    finally:
        for data in files.values():
            keys.wipe(data)


def saved_model_from_files(files: Mapping[str, bytearray | memoryview], source: str) -> Any:
    """``tf.saved_model.load`` of a SavedModel's decrypted files ({relative name: content}); the caller
    wipes them. ``source`` names the artifact in errors."""
    tf = _tensorflow()
    graphs = [n for n in files if n == "saved_model.pb" or n.endswith("/saved_model.pb")]
    if len(graphs) != 1:
        raise UsageError(f"{source} must hold exactly one SavedModel (saved_model.pb), found {len(graphs)}")
    root = f"ram://modelseal-{uuid.uuid4().hex}/"
    try:
        for name, data in files.items():
            target = root + name
            tf.io.gfile.makedirs(target.rsplit("/", 1)[0])
            view = memoryview(data).cast("B")
            with tf.io.gfile.GFile(target, "wb") as out:
                for start in range(0, len(view), CHUNK):
                    out.write(view[start : start + CHUNK].tobytes())
        return tf.saved_model.load(root + graphs[0].removesuffix("saved_model.pb"))
    finally:
        if tf.io.gfile.exists(root):
            tf.io.gfile.rmtree(root)
