"""Random-access rows from parquet and JSON Lines files (the EasyR1 on-disk formats).

A row source is a sequence of raw records (dicts) over one or more files, addressed by
a global row index. Reading a row that is not a record raises BadRowError, so the reader
can skip it by reason; `where(index)` names the file and row for the warning.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
from typing import Any, Iterable, Protocol, Sequence

import numpy as np
import pyarrow.parquet as pq

from vlcal_jax.data.skips import BadRowError

_SUFFIXES = (".parquet", ".jsonl", ".json")


class RowSource(Protocol):
    """What RecordReader reads from: a fixed number of rows, each a dict."""

    def __len__(self) -> int: ...

    def row(self, index: int) -> dict[str, Any]: ...

    def where(self, index: int) -> str: ...

    def keep_only(self, indices: Iterable[int]) -> None:
        """A hint that only these rows will be read (memory may be released for the rest)."""


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files named by paths, directories (their parquet/JSON files) or glob patterns."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"{path}: directory has no {'/'.join(_SUFFIXES)} file")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        elif glob.has_magic(path) and glob.glob(path):
            files.extend(sorted(glob.glob(path)))
        else:
            raise FileNotFoundError(f"{path}: no such data file, directory or matching pattern")
    for path in files:
        if not path.endswith(_SUFFIXES):
            raise ValueError(f"{path}: unsupported data file; expected one of {_SUFFIXES}")
    return files


class FileRows:
    """The rows of several parquet / JSONL files, concatenated in the order given.

    Args:
      paths: files, directories or glob patterns (see `expand_paths`).
      columns: the parquet columns to read (None: all); others are never loaded.
      required: parquet columns every file must have; a file without one is a
        configuration error (the key is probably misspelt), not a bad row.
    """

    def __init__(self, paths, columns: Sequence[str] | None = None,
                 required: Sequence[str] = ()):
        self.files = [_open_file(path, columns, required) for path in expand_paths(paths)]
        self._starts = [0]
        for file in self.files:
            self._starts.append(self._starts[-1] + len(file))

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        file_index = bisect.bisect_right(self._starts, index) - 1
        return self.files[file_index], index - self._starts[file_index]

    def row(self, index: int) -> dict[str, Any]:
        file, local = self._locate(index)
        return file.row(local)

    def where(self, index: int) -> str:
        file, local = self._locate(index)
        return f"{file.path} row {local}"

    def keep_only(self, indices: Iterable[int]) -> None:
        per_file: list[list[int]] = [[] for _ in self.files]
        for index in indices:
            file_index = bisect.bisect_right(self._starts, index) - 1
            per_file[file_index].append(index - self._starts[file_index])
        for file, local in zip(self.files, per_file):
            file.keep_only(local)


def _open_file(path: str, columns, required):
    if path.endswith(".parquet"):
        return _ParquetFile(path, columns, required)
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if path.endswith(".json") and head.startswith(b"["):
        return _JsonArrayFile(path)
    return _JsonLinesFile(path)


class _JsonLinesFile:
    """One JSON object per non-blank line; lines are read and parsed only when asked for."""

    def __init__(self, path: str):
        self.path = path
        self._offsets: list[int] = []
        with open(path, "rb") as handle:
            offset = 0
            for line in handle:
                if line.strip():
                    self._offsets.append(offset)
                offset += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def keep_only(self, local: Sequence[int]) -> None:
        del local  # lines are read on demand; nothing is held

    def row(self, local: int) -> dict[str, Any]:
        with open(self.path, "rb") as handle:
            handle.seek(self._offsets[local])
            raw = handle.readline()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRowError("undecodable_text", f"line is not UTF-8: {error}") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as error:
            raise BadRowError("bad_record", f"invalid JSON: {error}") from None
        if not isinstance(record, dict):
            raise BadRowError("bad_record", f"a JSON {type(record).__name__}, not an object")
        return record


class _JsonArrayFile:
    """A JSON file holding one array of objects (read whole: such files are small)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as handle:
            try:
                self._rows = json.loads(handle.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"{path}: not a JSON array of records: {error}") from None

    def __len__(self) -> int:
        return len(self._rows)

    def keep_only(self, local: Sequence[int]) -> None:
        del local

    def row(self, local: int) -> dict[str, Any]:
        record = self._rows[local]
        if not isinstance(record, dict):
            raise BadRowError("bad_record", f"a JSON {type(record).__name__}, not an object")
        return record


class _ParquetFile:
    """A parquet file, loaded (needed columns, kept rows only) when first read."""

    def __init__(self, path: str, columns, required):
        self.path = path
        schema = pq.read_schema(path)
        missing = [key for key in required if key not in schema.names]
        if missing:
            raise ValueError(f"{path}: no column {missing}; the file has columns {schema.names}")
        self._columns = None if columns is None else [c for c in columns if c in schema.names]
        self._num_rows = pq.ParquetFile(path).metadata.num_rows
        self._kept: np.ndarray | None = None  # sorted local rows kept after keep_only
        self._table = None

    def __len__(self) -> int:
        return self._num_rows

    def keep_only(self, local: Sequence[int]) -> None:
        kept = np.unique(np.asarray(local, np.int64))
        self._kept = None if len(kept) == self._num_rows else kept
        self._table = None

    def row(self, local: int) -> dict[str, Any]:
        if self._table is None:
            table = pq.read_table(self.path, columns=self._columns, memory_map=True)
            self._table = table.take(self._kept) if self._kept is not None else table
        position = local
        if self._kept is not None:
            position = int(np.searchsorted(self._kept, local))
            if position >= len(self._kept) or self._kept[position] != local:
                raise IndexError(f"{self.path}: row {local} was not kept by keep_only")
        record = {}
        for name in self._table.column_names:
            try:
                record[name] = self._table.column(name)[position].as_py()
            except UnicodeDecodeError as error:
                raise BadRowError("undecodable_text", f"column {name!r} is not UTF-8: {error}") from None
        return record
