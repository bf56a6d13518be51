"""The 13 evaluation sets of PAPER.md section 7, read from their public release layouts.

Every set becomes the common schema (`Example`): id "<set>/<original id>", the question
with its choices written in ("Choices:\\nA. ...") and one `<image>` per image, the decoded
images, the gold answer (an option letter for multiple choice), its answer type and a
category. Nothing is downloaded: each set must already lie in a local directory, laid out
as its publisher releases it (each adapter's docstring says how); a missing one is an
error that names the set, where it is published and where to put it.

    examples = load_benchmark("mathvista", "/data/MathVista")             # testmini
    examples = load_benchmark("mmmu_pro", "/data/MMMU_Pro", subset="vision")

Rows that cannot be read are skipped, counted and named in warnings, as by RecordReader.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

from vlcal_jax.data._bench_common import Benchmark, Context
from vlcal_jax.data._bench_general import AOKVQA, CLEVR, LOGICVISTA, MMK12, MMMU_PRO, VIRL39K
from vlcal_jax.data._bench_math import (
    DYNAMATH,
    GEOMETRY3K,
    MATHVERSE,
    MATHVERSE_VISION_ONLY,
    MATHVISION,
    MATHVISTA,
    WEMATH,
)
from vlcal_jax.data.example import Example
from vlcal_jax.data.skips import BadRowError, SkipCounter

logger = logging.getLogger("vlcal_jax.data")

# In the order of PAPER.md section 7.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    DYNAMATH, GEOMETRY3K, MATHVERSE, MATHVISION, MATHVISTA, WEMATH, LOGICVISTA, CLEVR,
    MATHVERSE_VISION_ONLY, AOKVQA, MMK12, MMMU_PRO, VIRL39K)}


def benchmark_names() -> list[str]:
    return list(BENCHMARKS)


def iter_benchmark(name: str, root: str | os.PathLike, *, split: str | None = None,
                   limit: int | None = None, shard_index: int = 0, shard_count: int = 1,
                   max_warnings_per_reason: int | None = 100,
                   **options: Any) -> Iterator[Example]:
    """Yields the usable examples of one set, in release order.

    Args:
      name: a key of BENCHMARKS.
      root: the directory holding the set's release.
      split: the split to read (default: the set's evaluation split).
      limit: read only the first `limit` rows (before sharding).
      shard_index, shard_count: read rows shard_index, shard_index + shard_count, ...
        (so several processes evaluate disjoint parts).
      options: adapter options (`variants` for dynamath, `subset` for mmmu_pro).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    benchmark = BENCHMARKS[name]
    ctx = Context(benchmark, os.fspath(root), split or benchmark.default_split,
                  {**benchmark.defaults, **options})
    if not os.path.isdir(ctx.root):
        raise ctx.missing("no directory")
    skipped = SkipCounter(max_warnings_per_reason)
    yielded = 0
    for index, (where, record) in enumerate(benchmark.rows(ctx)):
        if limit is not None and index >= limit:
            break
        if index % shard_count != shard_index:
            continue
        try:
            if isinstance(record, BadRowError):
                raise record
            example = benchmark.convert(record, ctx)
        except BadRowError as error:
            skipped.skip(where, error)
            continue
        yielded += 1
        yield example
    logger.log(logging.WARNING if skipped.total else logging.INFO, "%s (%s, split %s): %d "
               "examples; %s", benchmark.title, ctx.root, ctx.split, yielded, skipped.summary())
    if yielded == 0:
        raise ValueError(f"{benchmark.title} ({name}) at {ctx.root}: no usable row in split "
                         f"{ctx.split!r} (shard {shard_index}/{shard_count}): {skipped.summary()}")


def load_benchmark(name: str, root: str | os.PathLike, **kwargs: Any) -> list[Example]:
    """All usable examples of one set as a list; see `iter_benchmark` for the arguments."""
    return list(iter_benchmark(name, root, **kwargs))
