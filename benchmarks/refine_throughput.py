"""Refine throughput on the embedded model: samples/minute batched vs one sample at a time.

    python benchmarks/refine_throughput.py --samples 16 --batch-size 16

Runs the whole stage (rewrite, filter, fusion, judges) twice on the same demo samples, once with
generation batched across samples and once with batch size 1, and prints both rates and their
ratio. Every rewrite is accepted (tau=-1) and one fusion round is run, so both runs do the same
phases for every sample whatever the sampled texts are.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from raftune.refine import RefineConfig, refine


def rate(batch_size: int, args) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as out:
        cfg = RefineConfig(data="demo", out_dir=out, limit=args.samples, batch_size=batch_size, tau=-1.0,
                           rounds=1, max_new_tokens=args.max_new_tokens, device=args.device, seed=args.seed)
        t0 = time.perf_counter()
        run = refine(cfg, progress=False)
        seconds = time.perf_counter() - t0
        summary = json.loads((run / "summary.json").read_text())
    return args.samples / seconds * 60, summary


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from raftune.generation import open_generator

    open_generator("default", device=args.device)  # load (and dequantize) before timing
    batched, sb = rate(args.batch_size, args)
    single, ss = rate(1, args)
    print(f"samples: {args.samples}, max_new_tokens: {args.max_new_tokens}")
    print(f"batched (batch {args.batch_size}): {batched:.2f} samples/min, {sb['generated_tokens']} tokens generated")
    print(f"one at a time:       {single:.2f} samples/min, {ss['generated_tokens']} tokens generated")
    print(f"ratio batched / one-at-a-time: {batched / single:.2f}x")


if __name__ == "__main__":
    main()
