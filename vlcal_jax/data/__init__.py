"""Data: EasyR1-format records, the generated scene world, evaluation sets, TFDS.

    RecordReader(paths, image_dir=...)      EasyR1 parquet/JSONL -> Examples, sharded over
                                            processes, shuffled, resumable (state/restore)
    BlockReader(paths, block=b, ...)        the same, one global order read in per-process
                                            blocks (multi-process training: layout-independent)
    vlcal_jax.data.scenes                   generated scenes with perception ground truth
    vlcal_jax.data.benchmarks               the 13 evaluation sets of PAPER.md section 7
    vlcal_jax.data.tfds                     TFDS builder + reader (needs tensorflow-datasets)

The submodules are imported by name; only the last needs packages beyond the core ones.
"""

from vlcal_jax.data.example import (
    ANSWER_TYPES,
    IMAGE_PLACEHOLDER,
    Example,
    decode_image,
    decode_images,
    format_choices,
)
from vlcal_jax.data.reader import BlockReader, RecordReader, RecordSchema, example_from_record, read_examples
from vlcal_jax.data.skips import SKIP_REASONS, BadRowError, SkipCounter
from vlcal_jax.data.sources import FileRows, RowSource
