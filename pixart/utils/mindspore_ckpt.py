"""Read and write MindSpore ``.ckpt`` files as NumPy arrays, streaming, with no MindSpore import.

``mindspore.load_checkpoint`` reads the whole file into one protobuf message first, and
refuses files larger than the machine's *free* RAM (``SC_AVPHYS_PAGES``, which leaves out
the page cache). A 2.4 GB XL checkpoint therefore fails to load at random on a machine
whose memory is mostly cache. This reader walks the protobuf wire format over a
memory map, so it needs only the memory of the tensors it returns.

The file is a sequence of ``Checkpoint`` messages, each holding ``value`` entries
(field 1): ``tag`` (field 1, the name) and ``tensor`` (field 2: ``dims`` field 1,
``tensor_type`` field 2, ``tensor_content`` field 3). Tensors over 512 MB are split into
consecutive entries with the same tag. Strings from ``append_dict`` have type ``str`` and
hold UTF-32 text. A CRC trailer (``crc_num`` + 10 bytes), if present, ends the parse.

The writer produces the bytes ``mindspore.save_checkpoint`` does, but writes each tensor
straight from its NumPy buffer: MindSpore first copies every array into a Tensor, then into
``bytes``, then into a protobuf message, which made converting a 2.4 GB XL checkpoint take
twice as long.
"""
from __future__ import annotations

import mmap
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from pixart.utils.files import write_atomically
from pixart.utils.safetensors_io import bfloat16_to_float32
from pixart.errors import CheckpointFormatError

# keyed by MindSpore's dtype names (str(ms.float32) == "Float32"), as .ckpt files store them
NUMPY_DTYPES = {
    "Float32": np.float32, "Float16": np.float16, "Float64": np.float64,
    "Int8": np.int8, "Int16": np.int16, "Int32": np.int32, "Int64": np.int64,
    "UInt8": np.uint8, "UInt16": np.uint16, "UInt32": np.uint32, "UInt64": np.uint64, "Bool": np.bool_,
}
_MINDSPORE_NAMES = {np.dtype(v): k for k, v in NUMPY_DTYPES.items()}
_LENGTH_DELIMITED = 2
_VARINT = 0
# MindSpore splits a tensor's bytes into entries of at most SLICE_SIZE KB (512 MB)
SLICE_BYTES = 512 * 1024 * 1024


def _varint(buf, pos: int, end: int) -> Tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise CheckpointFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int) -> Iterator[Tuple[int, int, int, int]]:
    """(field number, wire type, start, stop) of each field; a varint's value is ``start``."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value, pos
        elif wire == _LENGTH_DELIMITED:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise CheckpointFormatError("truncated field")
            yield field, wire, pos, pos + length
            pos += length
        else:
            raise CheckpointFormatError(f"unexpected wire type {wire}")


def _tensor_entry(buf, start: int, stop: int) -> Tuple[List[int], str, Tuple[int, int]]:
    dims: List[int] = []
    tensor_type, content = None, None
    for field, wire, a, b in _fields(buf, start, stop):
        if field == 1 and wire == _VARINT:
            dims.append(a)
        elif field == 1 and wire == _LENGTH_DELIMITED:  # packed dims
            pos = a
            while pos < b:
                dim, pos = _varint(buf, pos, b)
                dims.append(dim)
        elif field == 2:
            tensor_type = bytes(buf[a:b]).decode()
        elif field == 3:
            content = (a, b)
    if tensor_type is None or content is None:
        raise CheckpointFormatError("tensor entry without type or content")
    return dims, tensor_type, content


def _entries(buf) -> Iterator[Tuple[str, Optional[Tuple[List[int], str, Tuple[int, int]]]]]:
    """(tag, tensor entry or None for map tensors) for each value in file order."""
    pos, end = 0, len(buf)
    while pos < end:
        if buf[pos:pos + 7] == b"crc_num":
            return
        key, pos = _varint(buf, pos, end)
        if key != (1 << 3 | _LENGTH_DELIMITED):
            raise CheckpointFormatError(f"unexpected top-level field key {key} at byte {pos}")
        length, pos = _varint(buf, pos, end)
        if pos + length > end:
            raise CheckpointFormatError(f"truncated: an entry at byte {pos} runs past the end of the file")
        tag, tensor = None, None
        for field, wire, a, b in _fields(buf, pos, pos + length):
            if field == 1 and wire == _LENGTH_DELIMITED:
                tag = bytes(buf[a:b]).decode()
            elif field == 2 and wire == _LENGTH_DELIMITED:
                tensor = _tensor_entry(buf, a, b)
        if tag is None:
            raise CheckpointFormatError(f"entry without a name at byte {pos}")
        yield tag, tensor
        pos += length


def _decode(buf, tag: str, dims: List[int], tensor_type: str, chunks: List[Tuple[int, int]]) -> Union[np.ndarray, str]:
    """One copy of the (possibly split) content out of the map, then typed and shaped."""
    raw = np.empty(sum(b - a for a, b in chunks), np.uint8)
    filled = 0
    for a, b in chunks:
        raw[filled:filled + b - a] = np.frombuffer(buf, np.uint8, count=b - a, offset=a)
        filled += b - a
    if tensor_type == "str":
        return raw.tobytes().decode("utf-32-le").rstrip("\x00")  # NumPy pads unicode arrays with NULs
    shape = tuple(dims) if dims != [0] else ()
    if tensor_type == "BFloat16":
        array = bfloat16_to_float32(raw)
    elif tensor_type in NUMPY_DTYPES:
        array = raw.view(NUMPY_DTYPES[tensor_type])
    else:
        raise CheckpointFormatError(f"tensor {tag!r} has unsupported type {tensor_type!r}")
    if array.size != int(np.prod(shape)):
        raise CheckpointFormatError(f"tensor {tag!r}: {array.size} values for shape {shape}")
    return array.reshape(shape)


def read_ckpt(path: str, select: Optional[Callable[[str], bool]] = None) -> Dict[str, Union[np.ndarray, str]]:
    """Name -> NumPy array (bf16 widened to float32) or string, for each entry ``select``
    accepts (all by default). Raises :class:`CheckpointFormatError` on a bad file."""
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointFormatError(f"{path}: empty file")
    out: Dict[str, Union[np.ndarray, str]] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pending_tag, pending = None, None
        chunks: List[Tuple[int, int]] = []
        try:
            for tag, tensor in _entries(buf):
                if tag != pending_tag and chunks:
                    out[pending_tag] = _decode(buf, pending_tag, pending[0], pending[1], chunks)
                    chunks = []
                pending_tag = tag
                if tensor is None or (select is not None and not select(tag)):
                    continue
                pending = tensor
                chunks.append(tensor[2])
            if chunks:
                out[pending_tag] = _decode(buf, pending_tag, pending[0], pending[1], chunks)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{path}: not a readable MindSpore checkpoint ({e})") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise CheckpointFormatError(f"{path}: not a MindSpore checkpoint, or an encrypted one ({e})") from None
    if not out and select is None:
        raise CheckpointFormatError(f"{path}: no tensors found")
    return out


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint_bytes(field << 3 | wire)


def _text_field(field: int, text: str) -> bytes:
    data = text.encode()
    return _key(field, _LENGTH_DELIMITED) + _varint_bytes(len(data)) + data


def _entry_header(tag: str, dims: List[int], tensor_type: str, content_length: int) -> bytes:
    """Everything of one ``Checkpoint`` message before its ``tensor_content`` bytes."""
    tensor = (b"".join(_key(1, _VARINT) + _varint_bytes(d) for d in dims) + _text_field(2, tensor_type)
              + _key(3, _LENGTH_DELIMITED) + _varint_bytes(content_length))
    value = (_text_field(1, tag) + _key(2, _LENGTH_DELIMITED) + _varint_bytes(len(tensor) + content_length)
             + tensor)
    return _key(1, _LENGTH_DELIMITED) + _varint_bytes(len(value) + content_length) + value


def _float_bits(array: np.ndarray, dtype: str) -> Tuple[str, np.ndarray]:
    """(MindSpore type name, array of the stored bits) of float ``array`` cast to ``fp32``,
    ``fp16`` or ``bf16`` as MindSpore's Cast does: rounding to nearest even, and a NaN becoming
    the canonical quiet NaN (keeping its sign in fp16, not in bf16)."""
    x = np.asarray(array, np.float32)
    if dtype == "fp32":
        return "Float32", x
    nan = np.isnan(x)
    if dtype == "fp16":
        with np.errstate(over="ignore"):
            bits = x.astype(np.float16).view(np.uint16)
        if nan.any():
            bits = np.where(nan, np.uint16(0x7E00) | (bits & np.uint16(0x8000)), bits)
        return "Float16", bits
    if dtype == "bf16":
        u = x.view(np.uint32)
        bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        if nan.any():
            bits = np.where(nan, np.uint16(0x7FC0), bits)
        return "BFloat16", bits
    raise ValueError(f"unknown float dtype {dtype!r}: fp32, fp16 or bf16")


def write_ckpt(path: str, entries: Dict[str, Union[np.ndarray, str]], float_dtype: Optional[str] = None) -> None:
    """Write name -> NumPy array or string as a MindSpore ``.ckpt`` (what
    ``mindspore.save_checkpoint`` writes for the same tensors, and strings as its
    ``append_dict`` does), atomically: nothing appears at ``path`` unless the whole file was
    written. ``float_dtype`` (``fp32`` / ``fp16`` / ``bf16``) casts the floating-point arrays;
    None keeps every dtype."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for name, value in entries.items():
                if isinstance(value, str):
                    content, dims, tensor_type = np.array(value).reshape(-1).view(np.uint8), [0], "str"
                else:
                    array = np.asarray(value)
                    dims = list(array.shape)
                    if float_dtype is not None and np.issubdtype(array.dtype, np.floating):
                        tensor_type, array = _float_bits(array, float_dtype)
                    elif array.dtype in _MINDSPORE_NAMES:
                        tensor_type = _MINDSPORE_NAMES[array.dtype]
                    else:
                        raise ValueError(f"{name}: dtype {array.dtype} has no MindSpore checkpoint type")
                    content = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
                for start in range(0, max(len(content), 1), SLICE_BYTES):
                    chunk = content[start:start + SLICE_BYTES]
                    f.write(_entry_header(name, dims, tensor_type, len(chunk)))
                    f.write(memoryview(chunk))
    write_atomically(path, write)
