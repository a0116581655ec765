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


class InvalidTensor:
    """Stands in for a tensor whose size, stride or offset do not fit its storage; ``load``
    refuses the file naming the tensor's key (the rebuild call does not know it)."""

    def __init__(self, reason: str):
        self.reason = reason


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """The tensor ``storage[offset]`` viewed with ``size`` and ``stride`` (in elements), copied.

    Every number comes from the file, so all are checked before NumPy sees them: a stride or
    offset past the storage would read other memory (or crash), and a storage shorter than
    the shape would leak whatever lies behind it into the output."""
    if not isinstance(storage, np.ndarray):
        return InvalidTensor(f"its storage is not a tensor storage ({type(storage).__name__})")
    size, stride = tuple(size) if isinstance(size, (tuple, list)) else size, \
        tuple(stride) if isinstance(stride, (tuple, list)) else stride
    if not (_is_count(offset) and isinstance(size, tuple) and isinstance(stride, tuple)
            and all(map(_is_count, size)) and all(map(_is_count, stride)) and len(size) == len(stride)):
        return InvalidTensor(f"malformed size {size!r}, stride {stride!r} or offset {offset!r}")
    numel = int(np.prod(size, dtype=object))
    extent = 0 if numel == 0 else offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if extent > storage.size or (numel == 0 and offset > storage.size):
        return InvalidTensor(f"size {list(size)}, stride {list(stride)} and offset {offset} reach element {extent} "
                             f"of a storage of {storage.size} elements: the file is corrupt or crafted")
    if numel == 0:
        return np.zeros(size, storage.dtype)
    itemsize = storage.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride)).copy()


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
                obj = _RestrictedUnpickler(f, archive, prefix).load()
        except TorchCheckpointError as e:
            raise TorchCheckpointError(f"{path}: {e}") from None
        except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, IndexError, KeyError,
                AttributeError, OverflowError, RecursionError) as e:  # a malformed pickle, whichever way
            raise TorchCheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    _refuse_invalid_tensors(obj, path)
    return obj


def _refuse_invalid_tensors(obj, path: str, where: str = "") -> None:
    """Raise naming the first InvalidTensor in the (nested) unpickled object."""
    if isinstance(obj, InvalidTensor):
        raise TorchCheckpointError(f"{path}: tensor {where or '(top level)'}: {obj.reason}")
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        _refuse_invalid_tensors(value, path, f"{where}.{key}" if where else str(key))
