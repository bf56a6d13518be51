"""TFDS: the scene-world builder (array_record, no TensorFlow) and reading TFDS by name."""

import io
import os

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")
pytest.importorskip("importlib_resources")

from vlcal_jax.data import scenes  # noqa: E402
from vlcal_jax.data import tfds as data_tfds  # noqa: E402

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    config = data_tfds.ScenesBuilderConfig(name="test12", num_train=12, num_test=4, seed=3,
                                           scene=scenes.SceneConfig(image_size=40, max_clutter=2))
    builder = data_tfds.build_scenes(data_dir, config)
    return data_dir, builder


def test_scene_builder_writes_array_record_that_reads_back_as_the_generator_made_it(scenes_dir):
    data_dir, builder = scenes_dir
    files = os.listdir(os.path.join(data_dir, "vlcal_scenes", "test12", "1.0.0"))
    assert any(".array_record" in f for f in files), files
    assert builder.info.splits["train"].num_examples == 12
    examples = data_tfds.read_tfds("vlcal_scenes/test12", "train", data_dir, id_key="id")
    config = scenes.SceneConfig(image_size=40, max_clutter=2)
    # TFDS stores examples in an order of its own (shuffled by key).
    assert sorted(e.id for e in examples) == [f"scene-3-{i:07d}" for i in range(12)]
    for example in examples:
        sample = scenes.generate_sample(int(example.id.rsplit("-", 1)[1]), 3, config)
        assert (example.id, example.question, example.answer) == (sample.id, sample.question, sample.answer)
        assert np.array_equal(np.asarray(example.images[0]), np.asarray(sample.image))
        assert scenes.score_perception(example.meta["teacher_response"], example).correct
    test = data_tfds.read_tfds("vlcal_scenes/test12", "test", data_dir, id_key="id")
    assert sorted(e.id for e in test) == [f"scene-3-{i:07d}" for i in range(12, 16)]


def test_tfds_reader_shards_and_resumes(scenes_dir):
    data_dir, _ = scenes_dir
    shards = [data_tfds.tfds_reader("vlcal_scenes/test12", "train", data_dir, id_key="id",
                                    process_index=p, process_count=2, num_epochs=1)
              for p in range(2)]
    ids = [{e.id for e in shard} for shard in shards]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 12
    reader = data_tfds.tfds_reader("vlcal_scenes/test12", "train", data_dir, process_index=0,
                                   process_count=1, seed=5)
    reader.take(4)
    state = reader.state()
    expected = [e.id for e in reader.take(3)]
    again = data_tfds.tfds_reader("vlcal_scenes/test12", "train", data_dir, process_index=0,
                                  process_count=1, seed=5)
    again.restore(state)
    assert [e.id for e in again.take(3)] == expected


def _png(value):
    buffer = io.BytesIO()
    Image.new("RGB", (5, 4), (value, value, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


class ToyVqa(tfds.core.GeneratorBasedBuilder):
    """Any third-party TFDS data set: a ClassLabel answer and a sequence of images."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "question": tfds.features.Text(),
            "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
            "label": tfds.features.ClassLabel(names=["cat", "dog"]),
            "source": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"validation": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):
            yield i, {"question": f"Which animal {i}?", "images": [_png(10 * i), _png(99)],
                      "label": i % 2, "source": "toy"}


def test_any_tfds_data_set_by_name(tmp_path):
    ToyVqa(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    examples = sorted(data_tfds.read_tfds("toy_vqa", "validation", tmp_path),
                      key=lambda e: e.question)
    assert [e.answer for e in examples] == ["cat", "dog", "cat"]
    assert examples[1].question == "<image><image>Which animal 1?"
    assert [im.getpixel((0, 0)) for im in examples[2].images] == [(20, 20, 0), (99, 99, 0)]
    assert examples[0].meta == {"source": "toy"}
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        data_tfds.read_tfds("toy_vqa", "validation", tmp_path / "elsewhere")
