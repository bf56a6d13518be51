"""RL-shaped rollouts: useful tokens/s of the continuous engine, the static engine and HF generate
at equal KV-cache memory, on response lengths with a long tail.

    python benchmarks/bench_rollout.py [--prompts 32 --n 8 --cap 512 --static_rows 32 --hf_calls 2 --repeats 1]

The mid-size random model of bench_sampler.py; each prompt holds one 128x128 image (16 merged
tokens) and a few text tokens (one 32-token length bucket). Lengths come from sampling the model
itself: vocab / (cap / 8) ids end a response, so the random model's almost uniform next-token
distribution stops a row with probability ~8 / cap at every step, and lengths are ~geometric
with mean cap / 8 (most rows end early, a few run long; the longest of a call sets the static
engine's steps). The stop probability is shifted by the number of EOS ids rather than by a bias
on one EOS logit (Qwen3-VL's LM head has no bias), which keeps the model unmodified and HF's
generate on the same footing; no engine is told any length. Temperature 1.

Equal KV cache: the static engine and HF run `--static_rows` rows (static_rows / n prompts) per
call, a cache of static_rows x (Tp + cap) tokens; the continuous engine takes every prompt in
one call and gets the slots that the same memory holds besides the prompts' prefilled KV
(S = static_rows - prompts * Tp / (Tp + cap)). Useful tokens are the responses' tokens up to
and including EOS (padding excluded). HF runs only the first `--hf_calls` calls (its rate per
call; the whole workload would take it minutes). Each timing is the best of `--repeats` rounds
run back to back.
"""

from __future__ import annotations

import argparse
import os
import sys

if "--threads" in sys.argv and sys.argv[sys.argv.index("--threads") + 1] == "1":  # before jax starts
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common import DESCRIPTION, hf_inputs, image_batch, models_pair, race  # noqa: E402
from vlcal_jax import sampling  # noqa: E402

GRID = (1, 8, 8)  # a 128x128 image at patch 16: 16 merged tokens
PROMPT_LEN = 32  # its length bucket
FIRST_EOS = 1000  # EOS ids are FIRST_EOS, FIRST_EOS + 1, ... (ordinary text ids of the random model)


def take(batch, start: int, stop: int):
    """Prompts [start, stop) of a batch whose prompts hold one image each."""
    ids, mask, pv, grids = batch
    patches = int(np.prod(GRID))
    return ids[start:stop], mask[start:stop], pv[start * patches:stop * patches], grids[start:stop]


def useful_tokens(tokens, eos) -> np.ndarray:
    """Per row: tokens up to and including the first EOS (all of them when none)."""
    tokens = np.asarray(tokens)
    stops = np.isin(tokens, eos)
    first = np.where(stops.any(1), stops.argmax(1) + 1, tokens.shape[1])
    return first


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--cap", type=int, default=512)
    parser.add_argument("--static_rows", type=int, default=32)
    parser.add_argument("--hf_calls", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="1: one thread on both sides (the per-core "
                        "comparison; an oversubscribed machine slows torch's OpenMP workers more than XLA's pool)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.static_rows % args.n or args.prompts % (args.static_rows // args.n):
        raise SystemExit(f"--static_rows={args.static_rows} must be whole prompts of n={args.n} that divide "
                         f"--prompts={args.prompts}")

    import torch

    hf, config, params = models_pair()
    batch = image_batch(config, args.prompts, GRID)
    assert batch[0].shape[1] <= PROMPT_LEN, batch[0].shape
    mean = args.cap / 8
    eos = tuple(range(FIRST_EOS, FIRST_EOS + round(config.text.vocab_size / mean)))
    per_call = args.static_rows // args.n
    calls = args.prompts // per_call
    slots = int(args.static_rows - args.prompts * PROMPT_LEN / (PROMPT_LEN + args.cap))
    settings = dict(max_new_tokens=args.cap, temperature=1.0, n=args.n, eos_token_ids=eos, length_buckets=(PROMPT_LEN,))
    results = {}

    def static(count=calls):
        outs = [sampling.generate(config, params, *take(batch, c * per_call, (c + 1) * per_call),
                                  rng=jax.random.fold_in(jax.random.key(1), c), engine="static", **settings)
                for c in range(count)]
        results["static"] = np.concatenate([np.asarray(o.lengths) for o in outs])

    def continuous():
        out = sampling.generate(config, params, *batch, rng=jax.random.key(1), engine="continuous", slots=slots,
                                **settings)
        results["continuous"] = np.asarray(out.lengths)

    torch.set_num_threads(args.threads or os.cpu_count())

    def theirs(calls=args.hf_calls, new=args.cap):
        lengths = []
        for c in range(calls):
            kwargs = hf_inputs(*take(batch, c * per_call, (c + 1) * per_call))
            with torch.no_grad():
                out = hf.generate(**kwargs, max_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0,
                                  top_k=0, num_return_sequences=args.n, eos_token_id=list(eos), pad_token_id=0)
            lengths.append(useful_tokens(out[:, kwargs["input_ids"].shape[1]:].numpy(), eos))
        results["hf"] = np.concatenate(lengths)

    best = race({"continuous": continuous, "static": static, "hf": theirs}, args.repeats,
                warmups={"static": lambda: static(1), "hf": lambda: theirs(1, 4)})  # compiles, cheaply
    rate = {name: results[name].sum() / best[name] for name in best}
    kv_token_rows = {"static / HF": args.static_rows * (PROMPT_LEN + args.cap),
                     "continuous": slots * (PROMPT_LEN + args.cap) + args.prompts * PROMPT_LEN}
    print(f"config: {DESCRIPTION}; {args.prompts} prompts x n={args.n}, one 128x128 image each ({PROMPT_LEN}-token "
          f"prompts), cap {args.cap} tokens, {len(eos)} EOS ids; jax {jax.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU cores{', 1 thread each' if args.threads == 1 else ''}, best of {args.repeats} rounds")
    for name in ("continuous", "static", "hf"):
        lengths = results[name]
        print(f"{name} response lengths: mean {lengths.mean():.1f} (target {mean:.0f}), median "
              f"{np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}, "
              f"{np.mean(lengths == args.cap):.1%} at the cap")
    print(f"KV cache (token rows): static and HF {kv_token_rows['static / HF']} ({args.static_rows} rows per call, "
          f"{calls} calls), continuous {kv_token_rows['continuous']} ({slots} slots + {args.prompts} prompts' KV)")
    for name, label in (("continuous", "vlcal_jax continuous"), ("static", "vlcal_jax static"),
                        ("hf", f"HF generate ({args.hf_calls} of {calls} calls)")):
        print(f"{label:<32} {results[name].sum():6d} useful tokens in {best[name]:6.2f} s  {rate[name]:7,.0f} "
              "tokens/s")
    print(f"continuous / static: {rate['continuous'] / rate['static']:.2f}x   continuous / HF: "
          f"{rate['continuous'] / rate['hf']:.2f}x   static / HF: {rate['static'] / rate['hf']:.2f}x")


if __name__ == "__main__":
    main()
