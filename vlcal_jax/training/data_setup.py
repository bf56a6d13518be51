"""Training data: the generated scene world (written once to the workdir) or EasyR1 files."""

from __future__ import annotations

import dataclasses
import logging
import os

import ml_collections

from vlcal_jax.data import benchmarks, reader, scenes
from vlcal_jax.training import storage

log = logging.getLogger("vlcal_jax.train")


@dataclasses.dataclass
class TrainData:
    """train_reader yields Examples forever (resumable); eval_examples is a fixed list;
    teacher_texts seed the demo tokenizer; sft_reader yields (example, teacher response)."""

    train_reader: reader.RecordReader
    eval_examples: list
    sft_source: reader.RecordReader | None
    teacher_texts: list[str]


def _reader_kwargs(d: ml_collections.ConfigDict) -> dict:
    return dict(prompt_key=d.prompt_key, answer_key=d.answer_key, image_key=d.image_key, id_key=d.id_key or None,
                choices_key=d.choices_key or None, answer_type_key=d.answer_type_key or None,
                category_key=d.category_key or None)


def setup_data(config: ml_collections.ConfigDict, run_dir: storage.RunDir) -> TrainData:
    """The run's data. Generated scenes live in `data.path`, else `workdir/data` (for a gs://
    workdir: in its local mirror; they are regenerated from `data.seed` on another machine)."""
    d = config.data
    if d.kind == "scenes":
        if d.path and storage.is_url(d.path):
            raise ValueError(f"config.data.path={d.path!r}: the scene world is written and read locally; "
                             "give a local directory (or leave it empty for workdir/data)")
        root = storage.resolve(d.path) if d.path else run_dir.local("data")
        if not os.path.exists(os.path.join(root, "dataset_info.json")):
            log.info("writing %d generated scenes to %s", d.num_examples, root)
            scenes.write_dataset(root, d.num_examples, seed=d.seed, config=scenes.SceneConfig(**dict(d.scene)),
                                 test_fraction=d.test_fraction, teacher_error_rate=d.teacher_error_rate)
        kwargs = dict(prompt_key="problem", answer_key="answer", image_key="images", id_key="id",
                      answer_type_key="answer_type", category_key="category", image_dir=root)
        train_files, eval_files = [os.path.join(root, "train.parquet")], [os.path.join(root, "test.parquet")]
    elif d.kind == "records":
        if not d.train_files:
            raise ValueError("config.data.train_files is empty: point it at EasyR1-format parquet/JSONL files "
                             "(e.g. VL-Calibration-12K) or use data.kind='scenes'")
        kwargs = dict(_reader_kwargs(d), image_dir=d.image_dir or None)
        train_files, eval_files = list(d.train_files), list(d.eval_files)
    else:
        raise ValueError(f"config.data.kind={d.kind!r}: use 'scenes' or 'records'")

    train_reader = reader.RecordReader(train_files, seed=d.seed, shuffle=True, **kwargs)
    if d.eval_benchmark:
        eval_examples = benchmarks.load_benchmark(d.eval_benchmark, d.eval_benchmark_dir, limit=config.eval.size)
    elif eval_files:
        eval_examples = reader.read_examples(eval_files, **kwargs)[:config.eval.size]
    else:
        eval_examples = []
    sft_source, teacher_texts = None, []
    if d.kind == "scenes":
        sft_source = reader.RecordReader(train_files, seed=d.seed + 1, shuffle=True, **kwargs)
        teacher_texts = [ex.question for ex in reader.read_examples(train_files, **kwargs)[:2000]]
        teacher_texts += [ex.meta["teacher_response"] for ex in reader.read_examples(train_files, **kwargs)[:2000]]
    log.info("train rows: %d (this process), eval examples: %d", len(train_reader), len(eval_examples))
    return TrainData(train_reader, eval_examples, sft_source, teacher_texts)
