"""Evaluate a model directory on a benchmark: accuracy, ECE, AUROC, Brier of its confidences.

    python -m vlcal_jax.evaluate --model_path DIR --benchmark mathvista --data_dir /data/MathVista
    python -m vlcal_jax.evaluate --model_path DIR --benchmark scenes --data_dir scenes/ --limit 200
    python -m vlcal_jax.evaluate --model_path DIR --benchmark records --data_dir rows.parquet

--model_path: an HF-format model directory (vlcal_jax.training.export: a Qwen3-VL download or an
exported model). --benchmark: one of the 13 sets of PAPER.md section 7 (names below), in
its release layout under --data_dir; "scenes": the directory written by
`python -m vlcal_jax.data.scenes` (its <split>.parquet, default test), scored for
perception too; "records": any EasyR1 parquet/JSONL file or directory (images relative
to it). Writes records.jsonl, metrics.json, table.md and reliability PNGs to --out, and
prints the table. Sampling defaults to the paper's validation setting (temperature 0.6,
top_p 0.95); --temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Sequence

from vlcal_jax import cli
from vlcal_jax.data import RecordReader, benchmarks
from vlcal_jax.eval import evaluate as evaluation
from vlcal_jax.rl.format import MODES
from vlcal_jax.training import export

log = logging.getLogger("vlcal_jax.evaluate")
FILE_SETS = ("scenes", "records")


def load_examples(benchmark: str, data_dir: str, *, split: str | None = None, limit: int | None = None) -> list:
    """The examples of `benchmark` (a name of data.benchmarks, "scenes" or "records") under `data_dir`."""
    if benchmark in benchmarks.benchmark_names():
        return benchmarks.load_benchmark(benchmark, data_dir, split=split, limit=limit)
    if benchmark not in FILE_SETS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of "
                         f"{', '.join(benchmarks.benchmark_names() + list(FILE_SETS))}")
    path = data_dir
    if benchmark == "scenes" and os.path.isdir(data_dir):
        path = os.path.join(data_dir, f"{split or 'test'}.parquet")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file; write the scene data set with "
                                    f"`python -m vlcal_jax.data.scenes --out {data_dir} --n 1000` "
                                    "or pass --split train")
    elif not os.path.exists(data_dir):
        raise FileNotFoundError(f"{data_dir}: no such data file or directory (--data_dir)")
    image_dir = data_dir if os.path.isdir(data_dir) else os.path.dirname(os.path.abspath(data_dir))
    reader = RecordReader(path, image_dir=image_dir, id_key="id", answer_type_key="answer_type",
                          category_key="category", shuffle=False, process_index=0, process_count=1, num_epochs=1)
    return reader.take(limit) if limit else list(reader)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vlcal_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True, help="HF-format model directory")
    parser.add_argument("--benchmark", required=True,
                        help=f"one of {', '.join(benchmarks.benchmark_names() + list(FILE_SETS))}")
    parser.add_argument("--data_dir", required=True, help="the benchmark's directory (or file, for records)")
    parser.add_argument("--split", default=None, help="split to read (default: the set's evaluation split)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--out", default=None, help="output directory (default: eval_results/<benchmark>)")
    parser.add_argument("--mode", default="decoupled", choices=MODES, help="response format")
    parser.add_argument("--prompt", default=None,
                        help="instruction (processing.INSTRUCTIONS); default: the model directory's vlcal_jax.json, "
                             "else --mode")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=evaluation.DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="continuous", choices=("continuous", "static"),
                        help="sampler: decode slots refilled as rows end, or every row to the batch's last")
    parser.add_argument("--decode_slots", type=int, default=0,
                        help="continuous engine: decode slots per batch (0: one per row, --batch_size)")
    parser.add_argument("--dtype", default="auto",
                        help="parameter dtype: auto (float32 on CPU, bfloat16 on TPU/GPU), float32, bfloat16")
    parser.add_argument("--min_pixels", type=int, default=None,
                        help="override the directory's preprocessor min_pixels (paper: 262144)")
    parser.add_argument("--max_pixels", type=int, default=None,
                        help="override the directory's preprocessor max_pixels (paper: 4194304)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit={args.limit} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> evaluation.EvalResult:
    args = parse_args(argv)
    export.check_model_dir(args.model_path)
    prompt = args.prompt or export.saved_prompt(args.model_path)
    evaluation.check_settings(args.mode, prompt, args.batch_size, args.max_new_tokens, args.temperature, args.top_p)
    examples = load_examples(args.benchmark, args.data_dir, split=args.split, limit=args.limit)
    log.info("%s: %d examples", args.benchmark, len(examples))
    config, params, tokenizer, image_config = export.load_model_dir(args.model_path,
                                                                    dtype=export.resolve_dtype(args.dtype))
    overrides = {k: getattr(args, k) for k in ("min_pixels", "max_pixels") if getattr(args, k) is not None}
    if overrides:
        image_config = dataclasses.replace(image_config, **overrides)
    result = evaluation.evaluate(config, params, tokenizer, image_config, examples, mode=args.mode, prompt=prompt,
                                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                 engine=args.engine, slots=args.decode_slots)
    result.settings.update(model_path=os.path.abspath(args.model_path), benchmark=args.benchmark,
                           data_dir=os.path.abspath(args.data_dir), split=args.split, limit=args.limit,
                           min_pixels=image_config.min_pixels, max_pixels=image_config.max_pixels)
    out_dir = args.out or os.path.join("eval_results", args.benchmark)
    paths = result.save(out_dir)
    print(result.table())
    print(f"wrote {', '.join(sorted(paths))} to {out_dir}")
    return result

if __name__ == "__main__":
    cli.run(main)
