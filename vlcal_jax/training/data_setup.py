"""Training data: the generated scene world (written once to the workdir) or EasyR1 files."""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import ml_collections

from vlcal_jax.data import benchmarks, reader, scenes, sources
from vlcal_jax.parallel import multihost
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


def per_process(total: int, name: str) -> int:
    """A global batch size -> each process's share (whole: processes never split a prompt)."""
    count = jax.process_count()
    if total % count:
        raise ValueError(f"{name}={total} must be a multiple of the {count} processes: each process takes "
                         f"{name} / {count} prompts of every batch")
    return total // count


def check_files(paths) -> None:
    """Every process must see the same data files: one that some process cannot read (or sees
    with another size) is an error on every process, naming the file and the processes, before
    any reader touches it (a process failing alone would leave the others waiting in a collective)."""
    if not multihost.multiprocess():
        return
    mine = {}
    for path in map(str, paths):
        try:
            files = sources.expand_paths(path)
            mine[path] = {"files": [[f, os.path.getsize(f)] for f in files]}
            for f in files:
                with open(f, "rb") as handle:
                    handle.read(1)
        except OSError as error:
            mine[path] = {"error": f"{type(error).__name__}: {error}"}
    seen = multihost.allgather_json(mine)
    for path in map(str, paths):
        views = [s[path] for s in seen]
        failed = [i for i, v in enumerate(views) if "error" in v]
        if failed:
            raise ValueError(f"data file {path} is not readable on process(es) {failed} of {len(seen)} "
                             f"({views[failed[0]]['error']}); every process must see the same data files "
                             "(a shared disk, or the same copy on every host)")
        differ = [i for i, v in enumerate(views) if v != views[0]]
        if differ:
            raise ValueError(f"data file {path} differs between processes: process 0 sees {views[0]['files']}, "
                             f"process {differ[0]} sees {views[differ[0]]['files']}; every process must see the "
                             "same data files")


def setup_data(config: ml_collections.ConfigDict, run_dir: storage.RunDir) -> TrainData:
    """The run's data. Generated scenes live in `data.path`, else `workdir/data` (for a gs://
    workdir: in its local mirror; they are regenerated from `data.seed` on another machine)."""
    d = config.data
    if d.kind == "scenes":
        if d.path and storage.is_url(d.path):
            raise ValueError(f"config.data.path={d.path!r}: the scene world is written and read locally; "
                             "give a local directory (or leave it empty for workdir/data)")
        root = storage.resolve(d.path) if d.path else run_dir.local("data")
        # process 0 writes first; a process on another host (no shared disk) writes its own copy
        # after it, from the same seed: the same files
        for writer_turn in (True, False):
            if writer_turn == (jax.process_index() == 0) and not os.path.exists(
                    os.path.join(root, "dataset_info.json")):
                log.info("writing %d generated scenes to %s", d.num_examples, root)
                scenes.write_dataset(root, d.num_examples, seed=d.seed, config=scenes.SceneConfig(**dict(d.scene)),
                                     test_fraction=d.test_fraction, teacher_error_rate=d.teacher_error_rate)
            multihost.barrier("scenes written" if writer_turn else "scenes everywhere")
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

    check_files(train_files + eval_files)
    count = jax.process_count()
    block = per_process(config.rl.prompts_per_step, "rl.prompts_per_step")
    train_reader = reader.BlockReader(train_files, block=block, seed=d.seed, shuffle=True, **kwargs)
    if d.eval_benchmark:
        eval_examples = benchmarks.load_benchmark(d.eval_benchmark, d.eval_benchmark_dir, limit=config.eval.size)
    elif eval_files:
        eval_examples = reader.read_examples(eval_files, **kwargs)[:config.eval.size]
    else:
        eval_examples = []
    sft_source, teacher_texts = None, []
    if d.kind == "scenes":
        sft_block = per_process(config.sft.batch_size, "sft.batch_size") if config.sft.steps else 1
        sft_source = reader.BlockReader(train_files, block=sft_block, seed=d.seed + 1, shuffle=True, **kwargs)
        teacher_texts = [ex.question for ex in reader.read_examples(train_files, **kwargs)[:2000]]
        teacher_texts += [ex.meta["teacher_response"] for ex in reader.read_examples(train_files, **kwargs)[:2000]]
    log.info("train rows: %d (this process of %d), eval examples: %d", len(train_reader), count, len(eval_examples))
    return TrainData(train_reader, eval_examples, sft_source, teacher_texts)
