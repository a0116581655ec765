"""Read and write `.safetensors` files as NumPy arrays, with no PyTorch.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to ``{"dtype", "shape", "data_offsets"}``, then the raw bytes.
We parse it ourselves rather than through ``safetensors.numpy`` because NumPy has no
bfloat16: bf16 tensors (common in Hugging Face folders) are widened to float32 here,
bit-exactly.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterable, Iterator, Optional

import numpy as np

from pixart.errors import SafetensorsError

_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}
_SAFETENSORS_DTYPES = {np.dtype(v).name: k for k, v in _NUMPY_DTYPES.items()}


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    """Little-endian bf16 bytes (uint8 array) -> float32, exactly: bf16 is a float32's high half."""
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


def read_header(path: str) -> Dict[str, dict]:
    """Return the JSON header (tensor name -> dtype/shape/offsets), without tensor data."""
    header, _ = _read_header_and_offset(path)
    return header


def _read_header_and_offset(path: str):
    if not os.path.isfile(path):
        raise SafetensorsError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise SafetensorsError(f"{path}: header length {n} exceeds file size {size}: truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        problem = _entry_problem(info)
        if problem:
            raise SafetensorsError(f"{path}: tensor {name!r}: {problem}")
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if data_start + end > size:
        raise SafetensorsError(
            f"{path}: truncated: the header promises {data_start + end} bytes, the file has {size}")
    return header, data_start


def _entry_problem(info) -> Optional[str]:
    """What is wrong with one tensor's header entry, or None: a known dtype, a shape of
    non-negative integers, and data offsets that hold exactly that many bytes."""
    if not isinstance(info, dict):
        return f"header entry is {type(info).__name__}, not an object"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype != "BF16" and dtype not in _NUMPY_DTYPES:
        return f"unsupported dtype {dtype!r}"
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        return f"shape {shape!r} is not a list of non-negative integers"
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        return f"data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"
    itemsize = 2 if dtype == "BF16" else np.dtype(_NUMPY_DTYPES[dtype]).itemsize
    expected = int(np.prod(shape, dtype=object)) * itemsize
    if offsets[1] - offsets[0] != expected:
        return f"shape {shape} ({dtype}) needs {expected} bytes, its data_offsets give {offsets[1] - offsets[0]}"
    return None


def load_file(path: str, names: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """Load tensors (all, or those in ``names``) as NumPy arrays; bf16 becomes float32.

    Each tensor is read straight into its own array rather than copied out of a memory map:
    mapped file pages count in the process's resident memory until unmapped, which would
    add a whole shard (GBs for T5-XXL) to the peak while loading."""
    header, data_start = _read_header_and_offset(path)
    wanted = header.keys() if names is None else names
    out = {}
    with open(path, "rb") as f:
        for name in wanted:
            info = header[name]
            begin, end = info["data_offsets"]
            dtype = info["dtype"]
            buf = np.empty(end - begin, dtype=np.uint8)
            f.seek(data_start + begin)
            f.readinto(buf)
            if dtype == "BF16":
                arr = bfloat16_to_float32(buf)
            else:
                arr = buf.view(_NUMPY_DTYPES[dtype])
            out[name] = arr.reshape(info["shape"])
    return out


def save_file(tensors: Dict[str, np.ndarray], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write NumPy arrays as a `.safetensors` file (atomically: a temporary file, then rename)."""
    header = {}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.name not in _SAFETENSORS_DTYPES:
            raise SafetensorsError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored")
        header[name] = {"dtype": _SAFETENSORS_DTYPES[arr.dtype.name], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def load_sharded_folder(folder: str, weights_name: str = "model") -> Dict[str, np.ndarray]:
    """Load a Hugging Face weights folder: ``{name}.safetensors`` or the shards listed in
    ``{name}.safetensors.index.json``. Raises ``SafetensorsError`` naming what is missing."""
    out = {}
    for shard in iter_sharded_folder(folder, weights_name):
        out.update(shard)
    return out


def iter_sharded_folder(folder: str, weights_name: str = "model") -> Iterator[Dict[str, np.ndarray]]:
    """Like ``load_sharded_folder``, but yields one shard's tensors at a time, so a caller that
    copies them into a model holds the model plus one shard, not the model plus all weights.
    Every shard's presence is checked before the first is read."""
    single = os.path.join(folder, f"{weights_name}.safetensors")
    index = single + ".index.json"
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        shards: Dict[str, list] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise SafetensorsError(f"{folder}: the index {os.path.basename(index)} lists shards that are "
                                   f"missing: {', '.join(sorted(missing))}")
        for shard, names in shards.items():
            yield load_file(os.path.join(folder, shard), names)
    elif os.path.isfile(single):
        yield load_file(single)
    else:
        raise SafetensorsError(f"{folder}: expected {os.path.basename(single)} or {os.path.basename(index)}, "
                               f"found neither")
