"""Peak memory and step time of training with and without gradient checkpointing.

    python benchmarks/train_memory.py --model default --data ../shared/data/medquad/qa.jsonl.gz \\
        --method raft --batch-size 8 --max-len 512 --rollout-tokens 64 --steps 3 --lora

Each setting trains for ``--steps`` steps through the real trainer (``raftune.train.train``) in a
process of its own, so that its peak is its own: the process's RSS high-water mark on CPU,
``torch.cuda.max_memory_allocated`` on CUDA. Step time is the median of the steps after the first
(rollout_s + other_s from metrics.jsonl). Prints both settings and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def child(args) -> dict:
    # the sibling benchmarks' pieces: the peak of this process, a run's seconds per step, the tiny Llama
    from kl_loss import peak_bytes
    from train_step import step_seconds, tiny_model

    from raftune.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model == "tiny":
            model = tiny_model(Path(tmp) / "tiny")
        cfg = TrainConfig(data=args.data, method=args.method, model=model, out_dir=tmp, batch_size=args.batch_size,
                          max_steps=args.steps, max_len=args.max_len, rollout_max_new_tokens=args.rollout_tokens,
                          lora=args.lora, save_every=10**9, name="run", gradient_checkpointing=args.gc == "on")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        run = train(cfg, progress=False)
        seconds = step_seconds(run, skip=1)
        last_ce = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]).get("ce")
    cuda = torch.cuda.is_available()
    return {"gc": args.gc, "peak_bytes": peak_bytes("cuda" if cuda else "cpu"),
            "where": "cuda max allocated" if cuda else "peak RSS", "step_seconds": seconds, "last_ce": last_ce}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama), 'default' or any model spec")
    p.add_argument("--data", default="demo")
    p.add_argument("--method", default="raft")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--rollout-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--gc", choices=["on", "off"], help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args()
    if args.gc:
        print(json.dumps(child(args)))
        return

    results = {}
    for gc in ("off", "on"):
        cmd = [sys.executable, os.path.abspath(__file__), "--gc", gc, *sys.argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"gradient checkpointing {gc}: exit code {proc.returncode}\n{proc.stderr[-3000:]}")
        results[gc] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"gradient checkpointing {gc:<3}: {r['where']} {r['peak_bytes'] / 2**30:.2f} GiB, "
              f"{r['step_seconds']:.2f} s/step, last CE {r['last_ce']}")
    off, on = results["off"], results["on"]
    print(f"{args.method}, {args.model}, batch {args.batch_size}, max_len {args.max_len}, lora {args.lora}: "
          f"peak off/on {off['peak_bytes'] / on['peak_bytes']:.2f}x, time on/off {on['step_seconds'] / off['step_seconds']:.2f}x")


if __name__ == "__main__":
    main()
