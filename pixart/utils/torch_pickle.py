"""Read PyTorch ``.pth``/``.pt`` checkpoints into NumPy arrays without PyTorch.

``torch.save`` writes a zip archive: ``<prefix>/data.pkl`` (a pickle whose tensors are
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls over
persistent storage ids) and ``<prefix>/data/<key>`` (each storage's raw little-endian
bytes). We unpickle with a restricted unpickler: it resolves only the few globals a
checkpoint needs (tensor rebuilding, storage types, OrderedDict) and turns every other
global into an inert placeholder, so no code from the file is ever executed.
"""
from __future__ import annotations

import collections
import pickle
import zipfile
from typing import Any

import numpy as np

from pixart.errors import TorchCheckpointError

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = _STORAGE_DTYPES[name]


class Placeholder:
    """Stands in for any class or function the checkpoint names that we do not trust."""

    def __init__(self, qualname: str, *args, **kwargs):
        self.qualname = qualname

    def __call__(self, *args, **kwargs):
        return Placeholder(self.qualname)

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<untrusted {self.qualname}>"


def _rebuild_tensor(storage, offset, size, stride, *unused):
    if not size:
        return storage[offset:offset + 1].reshape(())
    itemsize = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


def _rebuild_parameter(tensor, *unused):
    return tensor


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive = archive
        self.prefix = prefix
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name == "Size":
            return tuple
        return Placeholder(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise TorchCheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, _numel = pid
        if key not in self.storages:
            if not isinstance(storage_type, _StorageType):
                raise TorchCheckpointError(f"unsupported storage type {storage_type!r}")
            try:
                raw = self.archive.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise TorchCheckpointError(f"storage {key} is missing from the archive: truncated file?") from None
            except (zipfile.BadZipFile, EOFError, OSError) as e:
                raise TorchCheckpointError(f"storage {key} cannot be read ({e}): truncated file?") from None
            if storage_type.dtype == "bfloat16":
                arr = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                arr = np.frombuffer(raw, storage_type.dtype)
            self.storages[key] = arr
        return self.storages[key]


def load(path: str) -> Any:
    """Load a ``torch.save`` zip checkpoint; tensors come back as NumPy arrays (bf16 widened
    to float32). Raises ``TorchCheckpointError`` for anything else."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise TorchCheckpointError(
            f"{path}: not a PyTorch zip checkpoint (truncated, or saved by torch < 1.6 in the legacy format; "
            f"re-save it with a recent torch)") from None
    with archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pickles:
            raise TorchCheckpointError(f"{path}: zip archive without data.pkl: not a PyTorch checkpoint")
        prefix = pickles[0][: -len("/data.pkl")]
        try:
            with archive.open(pickles[0]) as f:
                return _RestrictedUnpickler(f, archive, prefix).load()
        except TorchCheckpointError as e:
            raise TorchCheckpointError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as e:
            raise TorchCheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
