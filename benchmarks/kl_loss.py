"""Distillation loss, chunked top-K vs naive full-vocabulary: time and peak memory of forward + backward.

    python benchmarks/kl_loss.py                                    # SmolLM2-135M's sizes: B 16, T 512, V 49152, D 576
    python benchmarks/kl_loss.py --batch 2 --length 64 --vocab 4096 --repeats 1   # a quick small run

Variants, each from the same hidden states of a teacher and a student (the student's head is
trained, the teacher's is not; the student's hidden states get gradients too):
  chunked      `chunked_teacher_topk` from the teacher's hidden states, then `chunked_topk_kl`:
               no (B, T, V) tensor ever exists, only (B, chunk, V) at a time.
  naive        both models' full fp32 logits (B, T, V), then `full_kl` (full-softmax KL).
  naive-topk   both full logits, then `teacher_topk` + `topk_kl`: the same loss as `chunked`,
               unchunked, which separates the effect of chunking from that of top-K.
The time is forward + backward (the teacher's logits included), the best of --repeats. Each
variant runs in a fresh child process (this script with --variant), so peaks are not shared: on
CPU the peak is the child's resident-set high-water mark (ru_maxrss; torch's CPU allocations are
invisible to tracemalloc), on CUDA torch.cuda.max_memory_allocated. "Loss memory" is the peak
minus what the inputs (hidden states, heads) already took before the first forward.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from raftune.losses import (
    chunked_teacher_topk,
    chunked_topk_kl,
    full_kl,
    reduce_step,
    teacher_topk,
    topk_kl,
)

VARIANTS = ("chunked", "naive", "naive-topk")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def make_inputs(args, device):
    """Teacher and student hidden states and heads; the student starts near the teacher (as in RAFT)."""
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    B, T, V, D = args.batch, args.length, args.vocab, args.hidden
    teacher_head = torch.nn.Linear(D, V, bias=False, device=device, dtype=dtype).requires_grad_(False)
    with torch.no_grad():
        teacher_head.weight.normal_(0.0, 3.0 / D**0.5)  # logits with a std of about 3, like a trained LM's
    student_head = torch.nn.Linear(D, V, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        student_head.weight.copy_(teacher_head.weight + 0.3 / D**0.5 * torch.randn_like(teacher_head.weight))
    h_teacher_BTD = torch.randn(B, T, D, device=device, dtype=dtype)
    h_student_BTD = (h_teacher_BTD + 0.1 * torch.randn_like(h_teacher_BTD)).requires_grad_()
    mask_BT = torch.ones(B, T, dtype=torch.bool, device=device)
    mask_BT[:, : T // 8] = False  # prompt positions carry no loss
    return teacher_head, student_head, h_teacher_BTD, h_student_BTD, mask_BT


def step(variant, args, teacher_head, student_head, h_teacher_BTD, h_student_BTD, mask_BT) -> float:
    n_tokens = int(mask_BT.sum())
    if variant == "chunked":
        logp_BTK, idx_BTK = chunked_teacher_topk(h_teacher_BTD, teacher_head, args.k, args.temperature, args.chunk)
        kl_BT = chunked_topk_kl(h_student_BTD, student_head, logp_BTK, idx_BTK, mask_BT, args.temperature,
                                chunk=args.chunk)
    else:
        with torch.no_grad():
            teacher_logits_BTV = teacher_head(h_teacher_BTD).float()
        student_logits_BTV = student_head(h_student_BTD).float()
        if variant == "naive":
            kl_BT = full_kl(student_logits_BTV, teacher_logits_BTV, mask_BT, args.temperature)
        else:
            logp_BTK, idx_BTK = teacher_topk(teacher_logits_BTV, args.k, args.temperature)
            kl_BT = topk_kl(student_logits_BTV, logp_BTK, idx_BTK, mask_BT, args.temperature)
    loss = reduce_step(kl_BT, mask_BT, n_tokens)
    loss.backward()
    return loss.item()


def run_variant(args) -> dict:
    """In the child: build the inputs, run the variant --repeats times, report time and peak."""
    device = args.device
    inputs = make_inputs(args, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    times, loss = [], None
    for _ in range(args.repeats):
        for p in (inputs[1].weight, inputs[3]):
            p.grad = None
        t0 = time.perf_counter()
        loss = step(args.variant, args, *inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = peak_bytes(device)
    return {"variant": args.variant, "device": device, "seconds": min(times), "all_seconds": times,
            "peak_bytes": peak, "loss_bytes": peak - base, "loss": loss, "threads": torch.get_num_threads()}


def spawn(variant, args, device) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--device", device]
    for name in ("batch", "length", "vocab", "hidden", "k", "chunk", "temperature", "repeats", "dtype", "seed"):
        cmd += [f"--{name}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        why = "killed, probably out of memory" if proc.returncode in (-9, 137) else proc.stderr.strip()[-2000:]
        return {"variant": variant, "device": device, "error": f"exit code {proc.returncode}: {why}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per variant; the best is reported")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="hidden states and heads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", action="append", choices=["cpu", "cuda"],
                   help="repeatable; default: cpu, and cuda when available")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # set in the child processes
    args = p.parse_args()

    if args.variant:
        args.device = args.device[0]
        print(json.dumps(run_variant(args)))
        return

    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    variants = [v.strip() for v in args.variants.split(",")]
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}")
    B, T, V = args.batch, args.length, args.vocab
    print(f"B {B}, T {T}, V {V}, D {args.hidden}, K {args.k}, chunk {args.chunk}, {args.dtype}; "
          f"one (B, T, V) fp32 tensor is {gib(B * T * V * 4)}; torch {torch.__version__}")
    for device in devices:
        results = {}
        for variant in variants:
            r = spawn(variant, args, device)
            results[variant] = r
            if "error" in r:
                print(f"{device} {variant:<11} {r['error']}")
                continue
            runs = ", ".join(f"{s:.2f}" for s in r["all_seconds"])
            print(f"{device} {variant:<11} {r['seconds']:8.2f} s (runs: {runs})"
                  f"  peak {gib(r['peak_bytes'])}, loss memory {gib(r['loss_bytes'])}"
                  f"  loss {r['loss']:.5f}  threads {r['threads']}")
        c = results.get("chunked")
        for other in ("naive", "naive-topk"):
            o = results.get(other)
            if c and o and "error" not in c and "error" not in o:
                print(f"{device} {other}/chunked: time {o['seconds'] / c['seconds']:.2f}x, "
                      f"peak {o['peak_bytes'] / c['peak_bytes']:.2f}x, "
                      f"loss memory {o['loss_bytes'] / max(c['loss_bytes'], 1):.2f}x")


if __name__ == "__main__":
    main()
