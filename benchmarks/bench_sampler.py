"""Sampler throughput: vlcal_jax.sampling.generate vs HF transformers generate (torch, CPU), same weights.

    python benchmarks/bench_sampler.py [--prompts 8 --n 4 --new 128 --repeats 3]

Mid-size config (text hidden 512, 8 layers, 8 heads / 2 KV heads, vocab 32000; vision depth 4,
hidden 256), one 224x224 image per prompt, temperature 1, every row decoded to the cap (no EOS).
Both engines: the static one, and the continuous one with a slot per row (every row runs to the
cap, so there is nothing to refill; it shows the per-step cost of the slot bookkeeping).
Prints tokens/s of each and of HF, the ratios, and per decode step our time against the
step's matmuls alone (its floor: every layer's projections and the LM head for the same rows,
timed the same way). All programs run back to back in each of `--repeats` rounds (best of each),
so on a shared machine each sees the same background load.
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

from common import DESCRIPTION, hf_inputs, image_batch, matmul_floor, models_pair, race  # noqa: E402
from vlcal_jax import sampling  # noqa: E402

FLOOR_STEPS = 32


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="1: one thread on both sides (the per-core "
                        "comparison; an oversubscribed machine slows torch's OpenMP workers more than XLA's pool)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    hf, config, params = models_pair()
    batch = image_batch(config, args.prompts)
    rows = args.prompts * args.n
    total_tokens = rows * args.new

    def ours(engine, new=args.new):
        def run():
            out = sampling.generate(config, params, *batch, rng=jax.random.key(1), max_new_tokens=new,
                                    temperature=1.0, n=args.n, engine=engine, slots=rows)
            out.tokens.block_until_ready()
        return run

    torch.set_num_threads(args.threads or os.cpu_count())
    hf_kwargs = hf_inputs(*batch) | dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=True,
                                         temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=args.n)

    def theirs():
        with torch.no_grad():
            hf.generate(**hf_kwargs)

    best = race({"static": ours("static"), "continuous": ours("continuous"), "prefill": ours("static", 1),
                 "floor": matmul_floor(config, params, rows, FLOOR_STEPS), "hf": theirs}, args.repeats)
    hf_tps = total_tokens / best["hf"]
    step_ms = {e: 1e3 * (best[e] - best["prefill"]) / (args.new - 1) for e in ("static", "continuous")}
    floor_ms = 1e3 * best["floor"] / FLOOR_STEPS
    print(f"config: {DESCRIPTION}; {args.prompts} prompts x n={args.n}, {args.new} new tokens, one 224x224 image "
          f"each; jax {jax.__version__}, torch {torch.__version__}, {os.cpu_count()} CPU cores"
          f"{', 1 thread each' if args.threads == 1 else ''}, best of {args.repeats} rounds")
    for engine in ("static", "continuous"):
        tps = total_tokens / best[engine]
        print(f"vlcal_jax {engine:<10} {best[engine]:6.2f} s  {tps:7,.0f} tokens/s  {tps / hf_tps:.2f}x HF   decode "
              f"step {step_ms[engine]:.1f} ms = {step_ms[engine] / floor_ms:.2f}x its matmul floor")
    print(f"HF generate          {best['hf']:6.2f} s  {hf_tps:7,.0f} tokens/s")
    print(f"decode step matmul floor ({rows} rows: every layer's projections + LM head): {floor_ms:.1f} ms; "
          f"prefill (vision + prompt + first token): {best['prefill']:.2f} s")


if __name__ == "__main__":
    main()
