"""EasyR1-format records -> Examples: sharded over processes, shuffled, resumable.

EasyR1 (and so VL-Calibration-12K and ViRL-39K) stores one question per row: `problem`
(with one `<image>` placeholder per image), `answer`, and `images` (a list of paths
relative to an image directory, raw bytes, or Hugging Face `{"bytes", "path"}` dicts).

Sharding: the rows are split once, by a seeded permutation, into `process_count`
disjoint shards of near-equal size (sizes differ by at most one row) whose union is the
data set; each epoch then visits the process's shard in a fresh seeded order. Across
processes every row is therefore read exactly once per epoch, and the global batch is a
random mix of the whole data set. Reading is lazy; parquet files are loaded (only the
needed columns, only this shard's rows) when first touched.

Bad rows are skipped, counted by reason and named in a warning (see skips.py); each epoch
ends with a logged summary, and an epoch in which the shard yields no example raises.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Sequence

import numpy as np

from vlcal_jax.data.example import Example, as_text, decode_images, with_image_placeholders
from vlcal_jax.data.skips import BadRowError, SkipCounter
from vlcal_jax.data.sources import FileRows, RowSource

logger = logging.getLogger("vlcal_jax.data")


@dataclasses.dataclass(frozen=True)
class RecordSchema:
    """Which record fields hold what. Fields not named here are kept in `Example.meta`."""

    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str | None = "images"
    id_key: str | None = None
    choices_key: str | None = None
    answer_type_key: str | None = None
    category_key: str | None = None
    default_answer_type: str = "free_form"

    def mapped_keys(self) -> set[str]:
        keys = (self.prompt_key, self.answer_key, self.image_key, self.id_key, self.choices_key,
                self.answer_type_key, self.category_key)
        return {key for key in keys if key is not None}


def example_from_record(record: dict[str, Any], schema: RecordSchema, *, default_id: str,
                        image_dir: str | os.PathLike | None = None) -> Example:
    """Builds an Example from one raw record; raises BadRowError if the row is unusable."""
    question = as_text(record.get(schema.prompt_key), schema.prompt_key)
    if not question or not question.strip():
        raise BadRowError("missing_prompt", f"no {schema.prompt_key!r}")
    answer = as_text(record.get(schema.answer_key), schema.answer_key)
    if answer is None or not answer.strip():
        raise BadRowError("missing_answer", f"no {schema.answer_key!r}")
    images = decode_images(record.get(schema.image_key) if schema.image_key else None, image_dir)
    question = with_image_placeholders(question, len(images))
    choices = record.get(schema.choices_key) if schema.choices_key else None
    if choices is not None:
        choices = [as_text(choice, schema.choices_key) or "" for choice in choices]
    answer_type = schema.default_answer_type
    if schema.answer_type_key and record.get(schema.answer_type_key):
        answer_type = as_text(record[schema.answer_type_key], schema.answer_type_key)
    category = ""
    if schema.category_key and record.get(schema.category_key) is not None:
        category = as_text(record[schema.category_key], schema.category_key)
    example_id = default_id
    if schema.id_key and record.get(schema.id_key) is not None:
        example_id = as_text(record[schema.id_key], schema.id_key)
    meta = {key: value for key, value in record.items() if key not in schema.mapped_keys()}
    return Example(id=example_id, question=question, images=images, answer=answer.strip(),
                   choices=choices, answer_type=answer_type, category=category, meta=meta)


class RecordReader:
    """Iterates Examples of this process's shard, epoch after epoch; resumable mid-epoch.

    Args:
      data: parquet/JSONL file(s), directories or glob patterns, or any RowSource.
      image_dir: directory that relative image paths are resolved against.
      prompt_key, answer_key, image_key, id_key, choices_key, answer_type_key,
        category_key: record field names (see RecordSchema); EasyR1's are the defaults.
      seed: seeds both the split into shards and every epoch's order.
      shuffle: False visits rows in file order (shards are then round-robin).
      process_index, process_count: this process's shard; default jax.process_index() and
        jax.process_count().
      num_epochs: stop after this many epochs; None iterates forever.
      prompt_length_fn, max_prompt_length: EasyR1's filter: rows whose
        `prompt_length_fn(example)` (tokenized prompt length) exceeds max_prompt_length
        are skipped as "prompt_too_long". None: no filter.
      max_warnings_per_reason: cap on per-row warnings per reason per epoch.
    """

    def __init__(self, data: Any, *, image_dir: str | os.PathLike | None = None,
                 prompt_key: str = "problem", answer_key: str = "answer",
                 image_key: str | None = "images", id_key: str | None = None,
                 choices_key: str | None = None, answer_type_key: str | None = None,
                 category_key: str | None = None, seed: int = 0, shuffle: bool = True,
                 process_index: int | None = None, process_count: int | None = None,
                 num_epochs: int | None = None,
                 prompt_length_fn: Callable[[Example], int] | None = None,
                 max_prompt_length: int | None = None,
                 max_warnings_per_reason: int | None = 100):
        self.schema = RecordSchema(prompt_key, answer_key, image_key, id_key, choices_key,
                                   answer_type_key, category_key)
        if max_prompt_length is not None and prompt_length_fn is None:
            raise ValueError("max_prompt_length needs prompt_length_fn (example -> token count)")
        if hasattr(data, "row") and hasattr(data, "where"):
            self.source: RowSource = data
        else:
            self.source = FileRows(data, required=(prompt_key, answer_key))
        if process_index is None or process_count is None:
            import jax  # pylint: disable=import-outside-toplevel
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.num_rows = len(self.source)
        if self.num_rows == 0:
            raise ValueError(f"{_describe(data)}: the data set has no row")
        self.image_dir = image_dir
        self.seed = int(seed)
        self.shuffle = shuffle
        self.process_index = process_index
        self.process_count = process_count
        self.num_epochs = num_epochs
        self.prompt_length_fn = prompt_length_fn
        self.max_prompt_length = max_prompt_length
        self.skipped = SkipCounter(max_warnings_per_reason)
        self.epoch_summaries: list[dict[str, Any]] = []
        self._description = _describe(data)
        self.shard_rows = self._shard_rows()
        self.source.keep_only(self.shard_rows.tolist())
        self._epoch = 0
        self._position = 0
        self._yielded = 0
        self._order = self._epoch_order(0)

    def _shard_rows(self) -> np.ndarray:
        """[num_rows / process_count] global row indices of this process, fixed for all epochs."""
        rows = np.arange(self.num_rows)
        if self.shuffle:
            rows = np.random.default_rng([self.seed]).permutation(self.num_rows)
        return rows[self.process_index::self.process_count]

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.shard_rows))
        return np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.shard_rows))

    def __len__(self) -> int:
        """Rows in this process's shard, before any is skipped."""
        return len(self.shard_rows)

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> "RecordReader":
        return self

    def __next__(self) -> Example:
        while True:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                raise StopIteration
            if self._position >= len(self._order):
                self._end_epoch()
                continue
            index = int(self.shard_rows[self._order[self._position]])
            self._position += 1
            example = self._take(index)
            if example is not None:
                return example

    def _take(self, index: int) -> Example | None:
        """Row `index` as an Example, counted as yielded; None (counted as skipped) for a bad row."""
        try:
            example = self._example(index)
        except BadRowError as error:
            self.skipped.skip(self.source.where(index), error)
            return None
        self._yielded += 1
        return example

    def _example(self, index: int) -> Example:
        example = example_from_record(self.source.row(index), self.schema,
                                      default_id=f"row{index}", image_dir=self.image_dir)
        if self.max_prompt_length is not None:
            length = int(self.prompt_length_fn(example))
            if length > self.max_prompt_length:
                raise BadRowError("prompt_too_long",
                                  f"prompt has {length} tokens > max_prompt_length {self.max_prompt_length}")
        return example

    def _end_epoch(self) -> None:
        summary = {"epoch": self._epoch, "examples": self._yielded, "skipped": self.skipped.as_dict()}
        self.epoch_summaries.append(summary)
        level = logging.WARNING if self.skipped.total else logging.INFO
        logger.log(level, "%s: epoch %d, shard %d/%d: %d examples from %d rows; %s",
                   self._description, self._epoch, self.process_index, self.process_count,
                   self._yielded, len(self.shard_rows), self.skipped.summary())
        if self._yielded == 0:
            raise ValueError(
                f"{self._description}: no usable row in shard {self.process_index} of "
                f"{self.process_count} ({len(self.shard_rows)} of {self.num_rows} rows): "
                f"{self.skipped.summary()}; the warnings above name each row")
        self._epoch += 1
        self._position = 0
        self._yielded = 0
        self.skipped.reset()
        self._order = self._epoch_order(self._epoch)

    def state(self) -> dict[str, Any]:
        """A JSON-able snapshot; `restore` of it makes the next examples the same ones."""
        return {"epoch": self._epoch, "position": self._position, "seed": self.seed,
                "shard": self.process_index, "num_shards": self.process_count,
                "num_rows": self.num_rows, "yielded": self._yielded,
                "skipped": self.skipped.as_dict()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from a `state()` taken by a reader over the same data, seed and shard."""
        expected = {"seed": self.seed, "shard": self.process_index,
                    "num_shards": self.process_count, "num_rows": self.num_rows}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ValueError(f"cannot restore reader state: its {key} is {state.get(key)!r}, this "
                                 f"reader's is {value!r} (different data, seed or process layout)")
        position = int(state["position"])
        if not 0 <= position <= len(self.shard_rows):
            raise ValueError(f"reader state position {position} outside [0, {len(self.shard_rows)}]")
        self._epoch = int(state["epoch"])
        self._position = position
        self._yielded = int(state.get("yielded", 0))
        self.skipped.load(state.get("skipped", {}))
        self._order = self._epoch_order(self._epoch)

    def take(self, count: int) -> list[Example]:
        """The next `count` examples (fewer if the last epoch ends first)."""
        examples = []
        for example in self:
            examples.append(example)
            if len(examples) == count:
                break
        return examples


def read_examples(data: Any, **kwargs) -> list[Example]:
    """Every usable example of a data set, in file order, once (for evaluation)."""
    kwargs.setdefault("shuffle", False)
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return list(RecordReader(data, num_epochs=1, **kwargs))


def _describe(data: Any) -> str:
    if isinstance(data, (str, os.PathLike)):
        return os.fspath(data)
    if isinstance(data, Sequence) and all(isinstance(d, (str, os.PathLike)) for d in data):
        return ", ".join(map(os.fspath, data))
    return getattr(data, "name", type(data).__name__)


class BlockReader(RecordReader):
    """A RecordReader whose processes share one global order, read in blocks of `block` rows:
    process p reads blocks p, p + P, p + 2P ... of the seeded epoch orders of the whole data set
    laid end to end. A step that takes `block` examples on every process therefore sees the
    same global batch (process after process) whatever the process count, which makes a run
    reproducible across layouts and lets a checkpoint resume on another process count
    (`restore` of any process's state). With one process the order is RecordReader's.

    A process still reads only its own rows (the rows of its blocks); a skipped bad row is
    replaced by the next row of the same process, so with bad rows the global batch depends on
    the layout."""

    def __init__(self, data: Any, *, block: int, **kwargs):
        if block < 1:
            raise ValueError(f"block={block} must be >= 1")
        self.block = int(block)
        self._k = 0  # stream items this process has consumed (read or skipped)
        super().__init__(data, **kwargs)
        self._keep_epoch_rows(0)

    def _shard_rows(self) -> np.ndarray:
        """Every row, in the seeded order every process shares (RecordReader's with one process)."""
        if self.shuffle:
            return np.random.default_rng([self.seed]).permutation(self.num_rows)
        return np.arange(self.num_rows)

    def _global_position(self, k: int) -> int:
        b, count = self.block, self.process_count
        return (k // b) * b * count + self.process_index * b + k % b

    def _keep_epoch_rows(self, epoch: int) -> None:
        if self.process_count == 1:
            return
        start = epoch * self.num_rows
        positions = np.arange(start, start + self.num_rows)
        mine = positions[(positions // self.block) % self.process_count == self.process_index] - start
        self.source.keep_only(self.shard_rows[self._epoch_order(epoch)[mine]].tolist())

    def __len__(self) -> int:
        """Rows this process reads per epoch (about num_rows / process_count)."""
        return self.num_rows // self.process_count + int(self.process_index < self.num_rows % self.process_count)

    def __next__(self) -> Example:
        while True:
            epoch, position = divmod(self._global_position(self._k), self.num_rows)
            if self.num_epochs is not None and epoch >= self.num_epochs:
                raise StopIteration
            while epoch > self._epoch:
                self._end_epoch()
                self._keep_epoch_rows(self._epoch)
            index = int(self.shard_rows[self._order[position]])
            self._k += 1
            self._position = position + 1
            example = self._take(index)
            if example is not None:
                return example

    def state(self) -> dict[str, Any]:
        return {**super().state(), "block": self.block, "consumed": self._k}

    def restore(self, state: dict[str, Any]) -> None:
        """Continues from a `state()` of a reader over the same data and seed, on this or another
        process layout: a state of another layout (process count or block) resumes at the first
        global step it had not started (steps are whole blocks of every process)."""
        for key, value in {"seed": self.seed, "num_rows": self.num_rows}.items():
            if state.get(key) != value:
                raise ValueError(f"cannot restore reader state: its {key} is {state.get(key)!r}, this "
                                 f"reader's is {value!r} (different data or seed)")
        if "consumed" in state:
            consumed, block, count = int(state["consumed"]), int(state["block"]), int(state["num_shards"])
        else:  # a RecordReader state of one process
            if state.get("num_shards", 1) != 1:
                raise ValueError("cannot restore a sharded RecordReader state into a BlockReader")
            consumed = int(state["epoch"]) * self.num_rows + int(state["position"])
            block, count = 1, 1
        same = block == self.block and count == self.process_count and state.get("shard") == self.process_index
        if same:
            self._k = consumed
        else:
            steps = -(-consumed // block)  # global steps started; each took `block` rows per process
            if consumed % block:
                logger.warning("reader state of another layout stopped inside a step (%d of %d rows); resuming "
                               "at the next step", consumed % block, block)
            self._k = steps * self.block
        self._epoch = self._global_position(self._k) // self.num_rows if self._k else 0
        self._position = 0
        self._yielded = int(state.get("yielded", 0)) if same else 0
        self.skipped.load(state.get("skipped", {}) if same else {})
        self._order = self._epoch_order(self._epoch)
        self._keep_epoch_rows(self._epoch)
