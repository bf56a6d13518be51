"""Streaming safetensors reader/writer on NumPy memmaps (bfloat16 through ml_dtypes).

Reading maps each file once and copies one tensor at a time, so a checkpoint never needs two
host copies; writing streams tensors to disk in the same way.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(name)`, `get(name) -> np.ndarray` (a copy)."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > 100 * 2**20:
                    raise ValueError("header larger than 100 MiB")
                header = json.loads(f.read(header_len))
        except (OSError, ValueError, struct.error) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e}); re-download it") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._entries = header
        self._offset = 8 + header_len
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) > self._offset else None

    def keys(self):
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        dtype = _DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        count = int(np.prod(entry["shape"], dtype=np.int64))
        if end - start != count * dtype.itemsize:
            raise ValueError(f"{self.path}: tensor {name} byte range does not match its shape; file is corrupt")
        raw = self._map[self._offset + start:self._offset + end]
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(entry["shape"]).copy()


def open_checkpoint(path: str) -> dict[str, SafetensorsFile]:
    """Maps every tensor name of a checkpoint directory to the file holding it.

    Supports `model.safetensors` and sharded `model.safetensors.index.json`.
    """
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: SafetensorsFile(os.path.join(path, name)) for name in sorted(set(weight_map.values()))}
        return {key: files[name] for key, name in weight_map.items()}
    if os.path.exists(single):
        file = SafetensorsFile(single)
        return {key: file for key in file.keys()}
    raise FileNotFoundError(
        f"{path}: no model.safetensors or model.safetensors.index.json. Download the checkpoint's "
        "safetensors weights (e.g. `huggingface-cli download Qwen/Qwen3-VL-4B-Instruct --local-dir DIR` "
        "on a machine with internet) and copy the directory here."
    )


def save_file(tensors, path: str, metadata: dict[str, str] | None = None) -> None:
    """Writes an iterable of (name, np.ndarray) to one safetensors file (arrays may be generated lazily)."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, array in tensors:
        dtype = np.dtype(array.dtype)
        if dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(array.size) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in tensors:
            f.write(np.ascontiguousarray(array).tobytes())
    os.replace(tmp, path)
