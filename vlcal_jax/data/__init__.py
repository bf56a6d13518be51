"""Data: EasyR1-format records, the generated scene world, evaluation sets, TFDS.

`vlcal_jax.data.scenes`, `vlcal_jax.data.benchmarks` and `vlcal_jax.data.tfds` are
imported by name (the last one needs tensorflow-datasets).
"""

from vlcal_jax.data.example import (
    ANSWER_TYPES,
    IMAGE_PLACEHOLDER,
    Example,
    decode_image,
    decode_images,
    format_choices,
)
from vlcal_jax.data.reader import RecordReader, RecordSchema, example_from_record, read_examples
from vlcal_jax.data.skips import SKIP_REASONS, BadRowError, SkipCounter
from vlcal_jax.data.sources import FileRows, RowSource
