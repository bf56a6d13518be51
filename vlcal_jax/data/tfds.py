"""TFDS: a builder for the scene world, and any TFDS data set read as Examples.

Both work without TensorFlow: the builder writes array_record files (images stored as
PNG bytes that PIL encodes), and reading goes through `tfds.data_source`, TFDS's
random-access, NumPy-only path. That path needs the data set in array_record form; a
data set stored as tfrecord must be converted first (`tfds convert_format`, or rebuilt
with file_format="array_record"). Nothing is downloaded: data must already be in
`data_dir`.

    builder = build_scenes("/data/tfds", "tiny")           # writes vlcal_scenes/tiny
    reader = tfds_reader("vlcal_scenes/tiny", "train", data_dir="/data/tfds")
    for example in reader: ...                             # a RecordReader over TFDS

Needs `tensorflow-datasets`, `array_record` and `importlib_resources` (no TensorFlow).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Sequence

import numpy as np

try:
    # TFDS imports the importlib_resources backport (undeclared) for builders in packages.
    import array_record  # noqa: F401  pylint: disable=unused-import
    import importlib_resources  # noqa: F401  pylint: disable=unused-import
    import tensorflow_datasets as tfds
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("vlcal_jax.data.tfds needs tensorflow-datasets, array_record and "
                      "importlib_resources (pip install tensorflow-datasets array_record "
                      "importlib_resources); TensorFlow is not needed") from error

from vlcal_jax.data.example import Example
from vlcal_jax.data.reader import RecordReader
from vlcal_jax.data.scenes import SceneConfig, generate_sample, teacher_response

_PROMPT_KEYS = ("problem", "question", "prompt", "query")
_ANSWER_KEYS = ("answer", "answers", "label", "solution")
_IMAGE_KEYS = ("images", "image")


@dataclasses.dataclass(eq=False)
class ScenesBuilderConfig(tfds.core.BuilderConfig):
    """How many scenes each split holds, the world's seed and its knobs."""

    num_train: int = 10_000
    num_test: int = 1_000
    seed: int = 0
    scene: SceneConfig = dataclasses.field(default_factory=SceneConfig)


class VlcalScenes(tfds.core.GeneratorBasedBuilder):
    """The generated scene world (vlcal_jax.data.scenes) as a TFDS data set."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        ScenesBuilderConfig(name="default", description="64x64, 10000 train / 1000 test"),
        ScenesBuilderConfig(name="hard", description="64x64, every difficulty knob on",
                            scene=SceneConfig(max_objects=8, size_scale=0.8, max_overlap=0.4,
                                              max_clutter=12, max_low_contrast=0.6)),
        ScenesBuilderConfig(name="tiny", description="48x48, 64 train / 16 test (tests)",
                            num_train=64, num_test=16, scene=SceneConfig(image_size=48)),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "id": text, "question": text, "answer": text, "answer_type": text,
                "category": text, "question_type": text,
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "difficulty": np.float32, "facts": text, "scene": text, "teacher_response": text,
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated, nothing to download
        config = self.builder_config
        return {
            "train": self._generate_examples(range(0, config.num_train)),
            "test": self._generate_examples(range(config.num_train,
                                                  config.num_train + config.num_test)),
        }

    def _generate_examples(self, indices: Sequence[int]):
        config = self.builder_config
        for index in indices:
            sample = generate_sample(index, config.seed, config.scene)
            png = io.BytesIO()
            sample.image.save(png, format="PNG")
            meta = sample.meta()
            yield sample.id, {
                "id": sample.id, "question": sample.question, "answer": sample.answer,
                "answer_type": sample.answer_type, "category": f"scenes/{sample.kind}",
                "question_type": sample.question_type, "image": png.getvalue(),
                "difficulty": sample.difficulty, "facts": json.dumps(meta["facts"]),
                "scene": json.dumps(meta["scene"]), "teacher_response": teacher_response(sample),
            }


def build_scenes(data_dir: str | os.PathLike, config: str | ScenesBuilderConfig = "default"
                 ) -> VlcalScenes:
    """Generates the scene world into `data_dir` as array_record (a no-op if already there)."""
    builder = VlcalScenes(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare()
    return builder


class TfdsRows:
    """A RowSource over one split of a prepared TFDS data set (array_record, no TF).

    ClassLabel features are turned into their names, so a label can be an answer.
    """

    def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None):
        self.name = f"tfds:{name}/{split}"
        try:
            builder = tfds.builder(name, data_dir=os.fspath(data_dir) if data_dir else None)
            self._source = builder.as_data_source(split=split)
        except Exception as error:  # TFDS raises many types; all mean "cannot read it here"
            raise FileNotFoundError(
                f"TFDS data set {name!r} split {split!r} cannot be read from "
                f"{data_dir or 'the default TFDS data dir'}: {error}. It must be prepared there "
                "beforehand (nothing is downloaded), in array_record format: prepare it with "
                "file_format='array_record', or convert a tfrecord copy with `tfds convert_format`"
            ) from error
        self.features = builder.info.features
        self._labels = {key: feature for key, feature in self.features.items()
                        if isinstance(feature, tfds.features.ClassLabel)}

    def __len__(self) -> int:
        return len(self._source)

    def row(self, index: int) -> dict[str, Any]:
        record = dict(self._source[index])
        for key, feature in self._labels.items():
            if key in record:
                record[key] = feature.int2str(int(record[key]))
        return {key: _plain(value) for key, value in record.items()}

    def where(self, index: int) -> str:
        return f"{self.name} row {index}"

    def keep_only(self, indices) -> None:
        del indices  # array_record reads each row on demand


def _plain(value: Any) -> Any:
    """NumPy scalars -> Python; Text (bytes) -> str; image arrays stay arrays.

    Bytes that are not UTF-8 stay bytes, so the reader skips the row as undecodable.
    """
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "SUO" and value.ndim == 1:
        return [_plain(v) for v in value.tolist()]
    return value


def _pick(given: str | None, candidates: Sequence[str], features, what: str) -> str | None:
    if given is not None:
        return given
    for key in candidates:
        if key in features:
            return key
    if what == "image":
        return None
    raise ValueError(f"no {what} feature among {list(candidates)} in {list(features)}; "
                     f"pass {what}_key=")


def tfds_reader(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
                prompt_key: str | None = None, answer_key: str | None = None,
                image_key: str | None = None, **reader_kwargs: Any) -> RecordReader:
    """A RecordReader (sharded, shuffled, resumable) over a prepared TFDS data set.

    Keys default to the first feature named problem/question/prompt/query,
    answer/answers/label/solution and images/image. `reader_kwargs` go to RecordReader
    (seed, process_index, process_count, num_epochs, id_key, prompt_length_fn, ...).
    """
    rows = TfdsRows(name, split, data_dir)
    features = rows.features.keys()
    return RecordReader(rows, prompt_key=_pick(prompt_key, _PROMPT_KEYS, features, "prompt"),
                        answer_key=_pick(answer_key, _ANSWER_KEYS, features, "answer"),
                        image_key=_pick(image_key, _IMAGE_KEYS, features, "image"),
                        **reader_kwargs)


def read_tfds(name: str, split: str, data_dir: str | os.PathLike | None = None,
              **kwargs: Any) -> list[Example]:
    """Every usable example of a TFDS split, in order, once (for evaluation)."""
    kwargs.setdefault("shuffle", False)
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return list(tfds_reader(name, split, data_dir, num_epochs=1, **kwargs))
