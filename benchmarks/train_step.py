"""Seconds per RAFT step / seconds per SFT step at the same batch, and rollout speed.

    python benchmarks/train_step.py --model tiny --steps 6                       # CPU, tiny random Llama
    python benchmarks/train_step.py --model default --data ../shared/data/medquad/qa.jsonl.gz \\
        --batch-size 16 --rollout-tokens 256 --steps 8                            # GPU, the peer table's settings

Each method trains for ``--steps`` steps through the real trainer (``raftune.train.train``); the
figure is the median wall time of steps 3..N from its metrics.jsonl (rollout_s + other_s), so the
first steps' warm-up and compilation are left out, as in the peer measurement of
../shared/gpu/README.md (TRL's DistillationTrainer: 7.45 s/step, 25.5x its SFT step).
Rollout speed against default ``generate``, and every other GPU figure: ``benchmarks/gpu.py``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch


def tiny_model(folder: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from raftune.models import load_tokenizer

    tok = load_tokenizer("default")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def step_seconds(run: Path, skip: int = 2) -> float:
    """Median seconds per step (rollout + the rest) of a training run, leaving out its first ``skip`` steps."""
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["rollout_s"] + r["other_s"] for r in rows if "lr" in r]
    return statistics.median(steps[skip:] or steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama), 'default' or any model spec")
    p.add_argument("--data", default="demo")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rollout-tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lora", action="store_true")
    args = p.parse_args()

    from raftune.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "tiny") if args.model == "tiny" else args.model
        seconds = {}
        for method in ("sft", "raft"):
            cfg = TrainConfig(data=args.data, method=method, model=model, out_dir=tmp, batch_size=args.batch_size,
                              max_steps=args.steps, rollout_max_new_tokens=args.rollout_tokens, lora=args.lora,
                              max_len=512, save_every=10**9, name=method)
            seconds[method] = step_seconds(train(cfg, progress=False))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; model: {args.model}; "
              f"batch {args.batch_size}; rollout {args.rollout_tokens} new tokens; median of steps 3..{args.steps}")
        print(f"SFT step:  {seconds['sft']:.3f} s")
        print(f"RAFT step: {seconds['raft']:.3f} s")
        print(f"ratio RAFT / SFT: {seconds['raft'] / seconds['sft']:.2f}x")


if __name__ == "__main__":
    main()
