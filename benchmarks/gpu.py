"""Every GPU figure of raftune in one command, one table and one JSON file.

    python benchmarks/gpu.py --model /tmp/smol --data ../shared/data/medquad/qa.jsonl.gz --out gpu.json   # one H100
    python benchmarks/gpu.py --model tiny --data ../shared/data/medquad/qa.jsonl.gz --out gpu.json --small  # CPU check

Parts (each timed on its own; one that fails is recorded with its error and the others still run; the
JSON is rewritten after every part):
  train      RAFT and SFT step through the real trainer (full fine-tuning, batch 16, 256 rollout tokens,
             median of steps 3..N), and peak GPU memory of the RAFT run
  trl        TRL's DistillationTrainer step at the same settings, when trl is importable
  rollout    rollout tokens/s of the engine vs default ``generate`` at batch 16 and 64 (256 new tokens),
             the trainer's set-up: fp32 master weights under bf16 autocast on CUDA; the engine's first
             call (compilation included) is reported apart
  ifeval     generation time of the IFEval prompts for one model (greedy, 1,024 new tokens, batch 64)
  refine     stage 1 throughput on MedQuAD samples, the local model as rewriter, fusion model and judge
  kl         the KL loss benchmark's CUDA memory (benchmarks/kl_loss.py --device cuda)
``--small`` shrinks every part to a CPU-sized check (a few steps, rows and tokens). GPU-only parts say
so on a machine without CUDA. ``--model tiny`` is a random 2-layer Llama with the embedded tokenizer.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmarks

from train_step import step_seconds, tiny_model  # noqa: E402

CUDA = torch.cuda.is_available()

# (part, figure, target on one H100) for the table; a target of None is informative only
TARGETS = {
    ("train", "raft_s_per_step"): ("<= 0.8 s", lambda v: v <= 0.8),
    ("train", "raft_over_sft"): ("<= 4x", lambda v: v <= 4),
    ("trl", "trl_over_raft"): (">= 10x", lambda v: v >= 10),
    ("rollout", "engine_tokens_per_s_b16"): (">= 20,000", lambda v: v >= 20_000),
    ("rollout", "engine_tokens_per_s_b64"): (">= 60,000", lambda v: v >= 60_000),
    ("ifeval", "seconds"): ("<= 60 s", lambda v: v <= 60),
    ("refine", "minutes_per_1000"): ("<= 5 min", lambda v: v <= 5),
}


def sync():
    if CUDA:
        torch.cuda.synchronize()


def prompts_of(tok, data: str, n: int) -> list[list[int]]:
    from raftune.data import load_qa
    from raftune.sequences import chat_prompt_ids

    examples = load_qa(data, limit=n)[0]
    return [chat_prompt_ids(tok, ex.question, ex.system) for ex in examples]


# --- parts ------------------------------------------------------------------------------------------


def part_train(args, model: str, tmp: Path) -> dict:
    from raftune.train import TrainConfig, train

    out = {}
    for method in ("sft", "raft"):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        cfg = TrainConfig(data=args.data, method=method, model=model, out_dir=str(tmp), batch_size=args.batch_size,
                          max_steps=args.steps, rollout_max_new_tokens=args.rollout_tokens, max_len=512,
                          save_every=10**9, name=f"bench-{method}", eval_data=None)
        out[f"{method}_s_per_step"] = step_seconds(train(cfg, progress=False))
        if CUDA:
            out[f"{method}_peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["raft_over_sft"] = out["raft_s_per_step"] / out["sft_s_per_step"]
    if not CUDA:
        out["note"] = "peak GPU memory: GPU-only"
    return out


def part_trl(args, model: str, tmp: Path, results: dict) -> dict:
    from peer_trl import trl_distillation_step

    from raftune.models import (
        resolve_model_path,  # TRL takes a folder or a hub id, not "default" or a .gguf
    )

    try:
        out = trl_distillation_step(resolve_model_path(model), args.data, args.batch_size, args.rollout_tokens, args.steps, str(tmp / "trl"))
    except ImportError as e:
        return {"skipped": f"trl is not importable ({e})"}
    out.pop("steps", None)
    raft = results.get("train", {}).get("raft_s_per_step")
    if raft:
        out["trl_over_raft"] = out["s_per_step"] / raft
    return out


def part_rollout(args, model_spec: str) -> dict:
    from transformers import GenerationConfig

    from raftune.generation.engine import DecodeEngine
    from raftune.models import load_model_and_tokenizer
    from raftune.sequences import end_of_turn_id

    model, tok = load_model_and_tokenizer(model_spec, dtype="fp32")  # the trainer's master weights
    eos = {end_of_turn_id(tok, model.generation_config), tok.eos_token_id}
    device_type = next(model.parameters()).device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16, enabled=CUDA)
    out = {}
    for batch in args.rollout_batches:
        prompts = prompts_of(tok, args.data, batch * 3)
        batches = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
        engine = DecodeEngine(model, pad_id=tok.pad_token_id, eos_ids=eos)

        def engine_run(p):
            return int(engine.generate(p, args.rollout_tokens, temperature=1.0, batch_bucket=batch).mask_BN.sum())

        def generate_run(p):
            from raftune.generation.engine import end_mask

            P = max(map(len, p))
            ids = torch.full((len(p), P), tok.pad_token_id)
            attn = torch.zeros_like(ids)
            for i, row in enumerate(p):
                ids[i, P - len(row):], attn[i, P - len(row):] = torch.tensor(row), 1
            gen = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                                 generation_config=GenerationConfig(max_new_tokens=args.rollout_tokens, do_sample=True,
                                                                    temperature=1.0, top_p=1.0, top_k=None,
                                                                    pad_token_id=tok.pad_token_id,
                                                                    eos_token_id=sorted(eos)))
            return int(end_mask(gen[:, P:].cpu(), eos).sum())

        for name, run in (("engine", engine_run), ("generate", generate_run)):
            with torch.no_grad(), autocast:
                sync()
                t0 = time.perf_counter()
                run(batches[0])  # warm-up: the engine compiles this bucket here
                sync()
                first = time.perf_counter() - t0
                t0, n = time.perf_counter(), 0
                for p in batches[1:]:
                    n += run(p)
                sync()
            out[f"{name}_tokens_per_s_b{batch}"] = n / (time.perf_counter() - t0)
            out[f"{name}_first_call_s_b{batch}"] = first
        out[f"engine_over_generate_b{batch}"] = out[f"engine_tokens_per_s_b{batch}"] / out[f"generate_tokens_per_s_b{batch}"]
    return out


def part_ifeval(args, model_spec: str) -> dict:
    from raftune.generation import LocalGenerator, SamplingParams
    from raftune.ifeval import load_ifeval
    from raftune.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(model_spec)  # bf16 on CUDA, as `raftune eval` loads it
    prompts = load_ifeval(args.ifeval_data)[: args.ifeval_limit]
    gen = LocalGenerator(model, tok, "bench", batch_size=args.ifeval_batch)
    sync()
    t0 = time.perf_counter()
    done = gen.chat([[{"role": "user", "content": p.prompt}] for p in prompts],
                    SamplingParams(max_new_tokens=args.ifeval_tokens, temperature=0.0))
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(c.completion_tokens for c in done)
    return {"prompts": len(prompts), "max_new_tokens": args.ifeval_tokens, "batch": args.ifeval_batch,
            "seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
            "stopped": sum(c.finish_reason == "stop" for c in done)}


def part_refine(args, model_spec: str, tmp: Path) -> dict:
    from raftune.generation import open_generator
    from raftune.refine import RefineConfig, refine

    open_generator(model_spec, batch_size=args.refine_batch)  # load before timing
    cfg = RefineConfig(data=args.data, model=model_spec, judges=(model_spec,), out_dir=str(tmp / "refine"),
                       limit=args.refine_samples, batch_size=args.refine_batch, max_new_tokens=args.refine_tokens)
    t0 = time.perf_counter()
    run = refine(cfg, progress=False)
    seconds = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text())
    return {"samples": args.refine_samples, "seconds": seconds, "samples_per_min": args.refine_samples / seconds * 60,
            "minutes_per_1000": seconds / args.refine_samples * 1000 / 60, "generated_tokens": summary.get("generated_tokens"),
            "batch": args.refine_batch, "max_new_tokens": args.refine_tokens}


def part_kl(args) -> dict:
    if not CUDA:
        return {"skipped": "GPU-only: the CUDA memory of benchmarks/kl_loss.py"}
    cmd = [sys.executable, str(HERE / "kl_loss.py"), "--device", "cuda", "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return {"output": proc.stdout.strip().splitlines()[-6:]}


# --- the command ------------------------------------------------------------------------------------


def table(results: dict) -> str:
    lines = [f"{'part':<8} {'figure':<32} {'value':>14}  {'target (H100)':<14} met"]
    for part, figures in results.items():
        if not isinstance(figures, dict):
            continue
        for key, value in figures.items():
            target, ok = TARGETS.get((part, key), ("", None))
            if isinstance(value, float):
                shown = f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
                met = ("yes" if ok(value) else "no") if ok and CUDA else ""  # the targets are an H100's
            else:
                shown, met = str(value), ""
            lines.append(f"{part:<8} {key:<32} {shown:>14}  {target:<14} {met}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="'tiny', 'default' (the embedded model) or any model spec or folder")
    p.add_argument("--data", default="../shared/data/medquad/qa.jsonl.gz", help="QA data for prompts and refine")
    p.add_argument("--ifeval-data", default="../shared/data/ifeval/input_data.jsonl")
    p.add_argument("--out", default="gpu.json", help="JSON file with every figure measured")
    p.add_argument("--parts", default="train,trl,rollout,ifeval,refine,kl", help="comma-separated subset")
    p.add_argument("--small", action="store_true", help="a CPU-sized run of every part")
    args = p.parse_args()
    big = not args.small
    args.batch_size, args.rollout_tokens, args.steps = (16, 256, 8) if big else (4, 16, 3)
    args.rollout_batches = [16, 64] if big else [2, 4]
    args.ifeval_limit, args.ifeval_tokens, args.ifeval_batch = (None, 1024, 64) if big else (8, 32, 4)
    args.refine_samples, args.refine_tokens, args.refine_batch = (256, 256, 64) if big else (4, 32, 4)

    results: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "model": args.model,
                     "torch": torch.__version__, "small": args.small}
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = tiny_model(tmp / "tiny") if args.model == "tiny" else args.model
        for part in args.parts.split(","):
            print(f"--- {part}", flush=True)
            t0 = time.perf_counter()
            try:
                if part == "train":
                    results[part] = part_train(args, model, tmp)
                elif part == "trl":
                    results[part] = part_trl(args, model, tmp, results)
                elif part == "rollout":
                    results[part] = part_rollout(args, model)
                elif part == "ifeval":
                    results[part] = part_ifeval(args, model)
                elif part == "refine":
                    results[part] = part_refine(args, model, tmp)
                elif part == "kl":
                    results[part] = part_kl(args)
                else:
                    raise ValueError(f"unknown part {part!r}")
            except Exception as e:  # noqa: BLE001 - one failing part must not lose the others' figures
                results[part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
                print(results[part]["traceback"], file=sys.stderr)
            results[part]["part_wall_s"] = time.perf_counter() - t0
            out.write_text(json.dumps(results, indent=2, default=str))
    print(table({k: {kk: vv for kk, vv in v.items() if kk != "traceback"} for k, v in results.items() if isinstance(v, dict)}))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
