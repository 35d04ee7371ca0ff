"""raftune's lm-eval model (RaftuneLM) against lm-eval's own hf backend: the same local tasks, the same model.

    python benchmarks/lm_eval_backend.py --model default --ifeval 16 --mmlu 16 --max-gen-toks 128 --batch-size 8
    python benchmarks/lm_eval_backend.py --model /tmp/smol --device cuda --dtype bf16 --ifeval 128 --mmlu 64

Tasks (written into a temporary folder from ../shared data, as ``raftune.lmeval_tasks`` writes them):
lm-eval's ``ifeval`` over the first ``--ifeval`` prompts (generate_until, greedy, chat template on,
``max_gen_toks`` capped by ``--max-gen-toks``) and lm-eval's ``mmlu`` over the first ``--mmlu`` questions
of ``--subjects`` (loglikelihood). Each backend evaluates each task ``--repeats`` times, the two
backends taking turns (hf first, then raftune first, ...: a machine shared with other work slows both
alike), after a warm-up call (its first forward and, on CUDA, the engine's compiled graphs are not
timed); the fastest run of each counts. Printed: seconds per task for both, the
ratio hf / raftune (above 1: raftune is faster), and whether the answers agree (every generation equal,
every log-likelihood within 1e-3, the greedy flags and the metrics equal).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="a model raftune loads (default: the embedded SmolLM2-135M)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ifeval", type=int, default=16, help="IFEval prompts (0: none)")
    p.add_argument("--max-gen-toks", type=int, default=128, help="lm-eval's ifeval asks 1,280; capped here")
    p.add_argument("--mmlu", type=int, default=16, help="questions per subject (0: none)")
    p.add_argument("--subjects", default="anatomy,astronomy")
    p.add_argument("--no-chat", action="store_true", help="plain prompts instead of the chat template")
    p.add_argument("--repeats", type=int, default=2, help="runs per backend and task, in alternating order; the fastest counts")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import lm_eval
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from raftune.ifeval import punkt_tab_nltk_dir
    from raftune.lmeval import RaftuneLM
    from raftune.lmeval_tasks import write_ifeval_task, write_mmlu_task
    from raftune.models import resolve_model_path

    punkt_tab_nltk_dir()
    folder = Path(tempfile.mkdtemp(prefix="lm-eval-backend-"))
    tasks = []
    if args.ifeval:
        tasks.append(("generate_until", [write_ifeval_task(folder, SHARED / "ifeval" / "input_data.jsonl", args.ifeval)]))
    if args.mmlu:
        tasks.append(("loglikelihood", write_mmlu_task(folder, SHARED / "mmlu", args.subjects.split(","), limit=args.mmlu)))
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    chat = not args.no_chat
    hf_dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[args.dtype]

    def load(which):
        start = time.perf_counter()
        if which == "raftune":
            lm = RaftuneLM(pretrained=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                           progress=False)
        else:
            lm = HFLM(pretrained=resolve_model_path(args.model), device=args.device, dtype=hf_dtype,
                      batch_size=args.batch_size)
        warm = [Instance("generate_until", {}, ("Hello", {"until": [], "max_gen_toks": 8, "do_sample": False}), 0),
                Instance("loglikelihood", {}, ("Hello", " world"), 0)]
        lm.generate_until(warm[:1])
        lm.loglikelihood(warm[1:])
        return lm, time.perf_counter() - start

    backends = {}
    for which in ("hf", "raftune"):
        backends[which] = load(which)
        print(f"{which}: loaded and warmed up in {backends[which][1]:.1f} s", file=sys.stderr)
    rows = []
    for kind, names in tasks:
        out, secs = {}, {"hf": float("inf"), "raftune": float("inf")}
        for r in range(args.repeats):
            for which in ("hf", "raftune") if r % 2 == 0 else ("raftune", "hf"):
                lm = backends[which][0]
                if which == "raftune":
                    lm.requests.entries.clear()  # answered again each time: its request log would serve them
                start = time.perf_counter()
                out[which] = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager,
                                                     apply_chat_template=chat, log_samples=True, bootstrap_iters=0,
                                                     gen_kwargs={"max_gen_toks": args.max_gen_toks})
                secs[which] = min(secs[which], time.perf_counter() - start)
        rows.append((kind, names, secs, agree(out["raftune"], out["hf"], names)))
    print(f"\nmodel {args.model}, {args.device} {args.dtype}, batch {args.batch_size}, chat {chat}, "
          f"fastest of {args.repeats}; "
          f"ifeval {args.ifeval} prompts x {args.max_gen_toks} tokens at most; mmlu {args.mmlu} x {args.subjects}\n")
    print("| request kind | tasks | hf s | raftune s | hf / raftune | answers agree |")
    print("|---|---|---|---|---|---|")
    for kind, names, secs, same in rows:
        print(f"| {kind} | {', '.join(names)} | {secs['hf']:.1f} | {secs['raftune']:.1f} | "
              f"{secs['hf'] / secs['raftune']:.2f} | {same} |")
    return 0


def agree(ours: dict, theirs: dict, names: list[str]) -> str:
    """"yes", or what differs first."""
    def flat(v):
        return [x for e in v for x in flat(e)] if isinstance(v, (list, tuple)) else [v]

    for task in names:
        for key, value in theirs["results"][task].items():
            mine = ours["results"][task].get(key)
            if isinstance(value, float) and isinstance(mine, float) and abs(mine - value) <= 1e-6 * max(1.0, abs(value)):
                continue
            if mine != value:
                return f"no: {task} {key} {mine} vs {value}"
        for i, (a, b) in enumerate(zip(ours["samples"][task], theirs["samples"][task])):
            for x, y in zip(flat(a["resps"]), flat(b["resps"])):
                if (abs(x - y) > 1e-3) if isinstance(y, float) else x != y:
                    return f"no: {task} document {i}: {str(x)[:60]!r} vs {str(y)[:60]!r}"
    return "yes"


if __name__ == "__main__":
    sys.exit(main())
