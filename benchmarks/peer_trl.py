"""Seconds per step of TRL's on-policy distillation, the peer raftune's RAFT step is compared against.

    python benchmarks/peer_trl.py --model /tmp/smol --data ../shared/data/medquad/qa.jsonl.gz \\
        --batch-size 16 --new-tokens 256 --steps 8 --out /tmp/peer_trl      # GPU, the peer table's settings

Times ``trl.DistillationTrainer`` (or ``GKDTrainer`` with lmbda=1 where it is missing) at the settings of
``benchmarks/train_step.py``: student and teacher the same causal LM, batch B of QA prompts, L new
tokens sampled on-policy with HF ``generate`` (no vLLM), forward KL (beta=0), no eval, no saving, no
reporting. Prints {"trl_version", "trainer", "s_per_step" (median of steps 3..N), "steps"} as JSON.
TRL is not a raftune dependency: it needs trl, datasets, dill and multiprocess importable.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.trainer_callback import PrinterCallback


class StepTimer(TrainerCallback):
    """Wall seconds of each optimizer step: on-policy generation, teacher and student passes, update."""

    def __init__(self):
        self.seconds: list[float] = []
        self._t0 = 0.0

    def _sync(self):
        if torch.cuda.is_available():  # CUDA runs asynchronously: wait, or the time lands in the next step
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.seconds.append(time.perf_counter() - self._t0)


def _trl_trainer():
    """(trl version, trainer name, trainer class, config class); DistillationTrainer first."""
    try:
        import trl
    except ImportError as e:
        raise ImportError(f"trl is not installed ({e}); install trl (with datasets) to time the peer") from e
    try:
        from trl import DistillationConfig, DistillationTrainer
        return trl.__version__, "DistillationTrainer", DistillationTrainer, DistillationConfig
    except ImportError:
        pass
    try:  # GKD moved to trl.experimental before DistillationTrainer appeared
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer
    return trl.__version__, "GKDTrainer", GKDTrainer, GKDConfig


def trl_distillation_step(model: str, data: str, batch_size: int, new_tokens: int, steps: int, out_dir: str) -> dict:
    version, name, Trainer, Config = _trl_trainer()
    from datasets import Dataset

    from raftune.data import load_qa

    cuda = torch.cuda.is_available()
    # as raftune's trainer: fp32 master weights, bf16 autocast on CUDA; a bf16 teacher there, fp32 on CPU
    student = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if cuda else torch.float32)
    tok = AutoTokenizer.from_pretrained(model, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    # one batch of fresh prompts per step, so no step sees a prompt twice
    examples, _ = load_qa(data, limit=batch_size * steps)
    rows = []
    for ex in examples:
        chat = ([{"role": "system", "content": ex.system}] if ex.system else []) + [
            {"role": "user", "content": ex.question}]
        # DistillationTrainer reads a "prompt" column of chat messages and applies the chat template itself.
        # GKD's collator reads "messages" and takes all but the last as the prompt. The answer is left empty:
        # lmbda=1 replaces it with the student's sample, and a long one would fill the collator's max_length
        # and make it refuse the row.
        rows.append({"prompt": chat} if name == "DistillationTrainer"
                    else {"messages": chat + [{"role": "assistant", "content": ""}]})

    common = dict(
        output_dir=out_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
        max_steps=steps, bf16=cuda, beta=0.0, temperature=1.0,  # beta=0: forward KL
        # TRL turns checkpointing on by default; raftune's step benchmark runs without it
        gradient_checkpointing=False,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
    )
    if name == "DistillationTrainer":  # always on-policy: it has no lmbda
        args = Config(**common, max_completion_length=new_tokens, use_vllm=False)
    else:  # lmbda=1: every step samples from the student
        args = Config(**common, max_new_tokens=new_tokens, lmbda=1.0, seq_kd=False)

    timer = StepTimer()
    trainer = Trainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tok, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # it prints the final train metrics: keep stdout one JSON line
    trainer.train()
    timed = timer.seconds[2:] if len(timer.seconds) >= 3 else timer.seconds  # steps 1-2: warm-up
    return {"trl_version": version, "trainer": name, "s_per_step": statistics.median(timed),
            "steps": timer.seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local causal LM folder (student and teacher)")
    p.add_argument("--data", required=True, help="QA JSONL(.gz) whose questions are the prompts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=None, help="trainer output folder (nothing is saved); default: a temp folder")
    args = p.parse_args()

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = trl_distillation_step(args.model, args.data, args.batch_size, args.new_tokens, args.steps,
                                       args.out or tmp)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
