"""raftune's IFEval and MMLU scorers against lm-evaluation-harness's, on the same responses and model.

    python benchmarks/lm_eval_agreement.py                              # everything below, tables printed
    python benchmarks/lm_eval_agreement.py --skip-end-to-end --json /tmp/agreement.json

IFEval (all prompts of ../shared/data/ifeval/input_data.jsonl):
1. the embedded model's greedy answers (raftune's engine, max 384 new tokens, batch 32), made once
   and cached under $RAFTUNE_CACHE/bench/, scored by ``raftune.ifeval.score`` and by lm-eval's
   ``process_results`` through the local task of ``raftune.lmeval_tasks`` (no model needed to score);
2. adversarial responses built from every prompt's own arguments (``adversarial_responses``: the
   boundary of each count, look-alike markers, case, fences, loose-only passes), scored both ways;
3. end to end: lm-eval's ``simple_evaluate`` over the local task with raftune's ``RaftuneLM`` (same
   decoding budget), its logged responses against the cached ones and its four figures against
   raftune's scorer on those responses.
Every verdict that differs is listed with the prompt, the instruction and the response's start.

MMLU (``--mmlu-subjects``, first ``--mmlu-limit`` test questions each, ``--shots``): raftune's
``score_mmlu`` (letter form, plain text: lm-eval's ``mmlu`` prompt) against lm-eval's ``hf`` backend
(``HFLM`` on the same model object) and ``RaftuneLM`` over the local ``mmlu_local_<subject>`` tasks:
accuracy, per-question predictions that differ, and the largest difference of a choice's
log-likelihood. lm-eval's langdetect is unseeded: the script seeds it (as raftune does) and
reports how many verdicts change between two unseeded lm-eval scorings of the same responses.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from raftune.files import atomic_write_jsonl, stable_hash
from raftune.ifeval import IFEvalPrompt, load_ifeval, punkt_tab_nltk_dir, score
from raftune.models import cache_dir

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KINDS = ("strict", "loose")
FIGURES = ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose")


# --- responses ------------------------------------------------------------------------------------

def ifeval_responses(input_data: str | Path, model_spec: str, max_new_tokens: int, batch_size: int) -> dict:
    """{key: response}: the model's greedy answers (fp32) to every prompt, made once and cached under
    $RAFTUNE_CACHE/bench/, keyed by the prompts' content, the model and the settings."""
    from raftune.generation import LocalGenerator, SamplingParams
    from raftune.models import load_model_and_tokenizer

    prompts = load_ifeval(input_data)
    key = stable_hash([[p.key, p.prompt] for p in prompts] + [model_spec, max_new_tokens])
    path = cache_dir() / "bench" / f"ifeval-responses-{model_spec}-{max_new_tokens}-{key}.jsonl"
    if path.is_file():
        return {r["key"]: r["response"] for r in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
    model, tok = load_model_and_tokenizer(model_spec, dtype="fp32")
    gen = LocalGenerator(model, tok, model_spec, batch_size=batch_size)
    outs = gen.chat([[{"role": "user", "content": p.prompt}] for p in prompts],
                    SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    atomic_write_jsonl(path, [{"key": p.key, "response": o.text} for p, o in zip(prompts, outs)])
    return {p.key: o.text for p, o in zip(prompts, outs)}


def _around(n: int) -> list[int]:
    return sorted({max(0, n - 1), n, n + 1})


def _words(n: int, word: str = "word") -> str:
    return " ".join([word] * n)


def _sentences(n: int) -> str:
    return " ".join(f"Sentence number {i} is here." for i in range(n))


def _for_instruction(iid: str, kw: dict, prompt: str) -> list[str]:
    """Responses on and around the boundary of one instruction, from its own arguments."""
    out: list[str] = []
    if iid == "keywords:existence":
        ws = kw["keywords"]
        out += [" ".join(ws), " ".join(w.upper() for w in ws), "x".join(ws) + "ing", " ".join(ws[:-1]),
                "**" + "** and **".join(ws) + "**", "\n".join(ws)]
    elif iid == "keywords:frequency":
        k = kw["keyword"]
        out += [" ".join([k] * n) for n in _around(kw["frequency"])]
        out += [(k.upper() + "s ") * kw["frequency"], k + k, f"{k[:-1]}-{k[-1:]} {k}"]
    elif iid == "keywords:forbidden_words":
        ws = kw["forbidden_words"]
        out += [f"About {w}." for w in ws] + [f"un{w}able {w}s" for w in ws]
        out += [f"({w.upper()})" for w in ws] + [f"{w}'s" for w in ws] + ["Nothing forbidden here."]
    elif iid == "keywords:letter_frequency":
        ch = kw["letter"]
        out += [(ch * n) + " text" for n in _around(kw["let_frequency"])]
        out += [(ch.upper() * kw["let_frequency"]) + " text", f"{ch} " * kw["let_frequency"], "no such letter"]
    elif iid == "language:response_language":
        out += ["Das ist ein schöner Tag und wir gehen heute in den Park.", "Hello there, friend.", "12345 !!!",
                "ok", "Bonjour", "यह एक वाक्य है।", "这是一个句子。", "Привет, как дела?", "Ciao come stai oggi amico"]
    elif iid == "length_constraints:number_sentences":
        out += [_sentences(n) for n in _around(kw["num_sentences"])]
        n = kw["num_sentences"]
        out += [" ".join(["Dr. Smith came."] * n), " ".join(["It cost 3.50 dollars."] * n),
                "\n".join(["- a bullet without a stop"] * n), " ".join(["Really?!"] * n), "...".join(["Wait"] * n)]
    elif iid == "length_constraints:number_words":
        n = kw["num_words"]
        out += [_words(m) for m in _around(n)] + [_words(max(1, n // 2), "don't"), _words(n, "well-known"),
                                                 _words(n, "naïve"), _words(n, "42")]
    elif iid == "length_constraints:number_paragraphs":
        n = kw["num_paragraphs"]
        for m in _around(n):
            out.append("\n***\n".join(f"Paragraph {i}." for i in range(max(m, 1))))
        out += ["***\n" + "\n***\n".join(f"P{i}" for i in range(n)) + "\n***",
                "\n* * *\n".join(f"P{i}" for i in range(n)), "\n***\n***\n".join(f"P{i}" for i in range(n)),
                " *** ".join(f"P{i}" for i in range(n)), "\n****\n".join(f"P{i}" for i in range(n))]
    elif iid == "length_constraints:nth_paragraph_first_word":
        n, nth, w = kw["num_paragraphs"], kw["nth_paragraph"], kw["first_word"]
        paras = [f"Paragraph {i} text." for i in range(n)]
        for first in (w, w.capitalize(), f'"{w}"', f"{w},", f"*{w}*", f"'{w}'s", "other"):
            p = list(paras)
            p[nth - 1] = f"{first} starts this one."
            out.append("\n\n".join(p))
        p = list(paras)
        p[nth - 1] = f"{w} starts this one."
        out += ["\n\n" + "\n\n".join(p), "\n\n\n".join(p), "\n\n".join(p + ["extra"]), "\n\n".join(p[:-1]),
                "\n\n".join(p).replace("\n\n", "\n \n")]
    elif iid == "detectable_content:number_placeholders":
        n = kw["num_placeholders"]
        out += [" ".join(f"[p{i}]" for i in range(m)) or "none" for m in _around(n)]
        out += [" ".join(["[a\nb]"] * n), "[[nested]] " * n, "[] " * n, "[x] [y" + "]" * n]
    elif iid == "detectable_content:postscript":
        m = kw["postscript_marker"]
        out += [f"Body.\n{m} note", f"Body.\n{m.lower()} note", f"Body. {m} inline", "Body.\nP.S. note",
                "Body.\nP.P.S. note", "Body.\np. s. note", "Body.\nP. P. S note", "Body.\nPS note",
                f"Body.\n\n{m}", "Body without one."]
    elif iid == "detectable_format:number_bullet_lists":
        n = kw["num_bullets"]
        out += ["\n".join(f"* item {i}" for i in range(m)) or "none" for m in _around(n)]
        out += ["\n".join(f"- item {i}" for i in range(n)), "\n".join(f"** bold {i}" for i in range(n)),
                "\n".join(f"  * nested {i}" for i in range(n)), "Intro\n---\n" + "\n".join(f"* i{i}" for i in range(n - 1)),
                "\n".join(f"*item{i}" for i in range(n)), "\n".join(f"• item {i}" for i in range(n)),
                "\n".join(f"1. item {i}" for i in range(n))]
    elif iid == "detectable_format:constrained_response":
        out += ["My answer is yes.", "my answer is yes.", "My answer is yes", "Well... My answer is maybe. Sure.",
                "My answer is no.\nBecause.", "Yes."]
    elif iid == "detectable_format:number_highlighted_sections":
        n = kw["num_highlights"]
        out += [" ".join(f"*part {i}*" for i in range(m)) or "none" for m in _around(n)]
        out += [" ".join(f"**bold {i}**" for i in range(n)), " ".join(["* *"] * n), " ".join(["**"] * (2 * n)),
                " ".join(f"*multi\nline {i}*" for i in range(n)), " ".join(f"***both {i}***" for i in range(n)),
                "*a* b *c*" * n]
    elif iid == "detectable_format:multiple_sections":
        s, n = kw["section_spliter"], kw["num_sections"]
        out += ["\n".join(f"{s} {i + 1}\ntext" for i in range(m)) or "none" for m in _around(n)]
        out += ["\n".join(f"{s.upper()} {i + 1} text" for i in range(n)), "\n".join(f"{s.lower()} {i + 1} t" for i in range(n)),
                "\n".join(f"{s}{i + 1} text" for i in range(n)), "\n".join(f"{s} one text" for i in range(n)),
                "\n".join(f"**{s} {i + 1}** text" for i in range(n))]
    elif iid == "detectable_format:json_format":
        out += ['{"a": 1}', '```json\n{"a": 1}\n```', '```JSON\n{"a": 1}\n```', '```\n[1, 2]\n```',
                'Here: {"a": 1}', '{"a": 1,}', '```json\n{"a": 1}\n```\nDone.', '"just a string"', "42",
                "```Json\n{}\n```", "```python\n{}\n```"]
    elif iid == "detectable_format:title":
        out += ["<<A title>>\nBody", "<< >>\nBody", "<<>>", "<<multi\nline>>", "< <x> >", "Title: <<x>> inline",
                "<<<triple>>>", "no title"]
    elif iid == "combination:two_responses":
        out += ["One.\n******\nTwo.", "One.\n******\nOne.", "One.\n******\nTwo.\n******\nThree.", "******\nOne.\n******\nTwo.\n******",
                "One.\n*****\nTwo.", "One.\n******\n\n******\nTwo.", "One. ****** Two.", "One.\n*******\nTwo."]
    elif iid == "combination:repeat_prompt":
        p = kw["prompt_to_repeat"]
        out += [p + "\nAnswer.", p.upper() + "\nAnswer.", "  " + p, p[:-1], "Sure! " + p, f'"{p}"', p.replace(" ", "  ", 1)]
    elif iid == "startend:end_checker":
        e = kw["end_phrase"]
        out += [f"Text. {e}", f"Text. {e.upper()}", f'Text. "{e}"', f"Text. {e}  \n", f"Text. {e}!", f"Text. {e[:-1]}",
                f"{e}\nmore", f"Text. **{e}**"]
    elif iid == "startend:quotation":
        out += ['"Quoted."', ' "Quoted." ', '"', '""', "'Single.'", '“Curly.”', '"Open only', 'Close only"', '"a"\n"b"']
    elif iid == "change_case:capital_word_frequency":
        n = kw["capital_frequency"]
        out += [_words(m, "WORD") + " and lower words" for m in _around(n)]
        out += [_words(n, "DON'T"), _words(n, "WELL-KNOWN"), _words(n, "A"), _words(n, "U.S.A."), _words(n, "ÉCOLE"),
                _words(n, "X1")]
    elif iid == "change_case:english_capital":
        out += ["THIS IS ALL CAPITALS AND IN ENGLISH.", "THIS IS MOSTLY CAPITALS but not all.", "DAS IST EIN SCHÖNER TAG.",
                "12345", "OK", "HELLO 123 !!!", "ÇA VA BIEN MERCI BEAUCOUP MON AMI."]
    elif iid == "change_case:english_lowercase":
        out += ["this is all lowercase and in english.", "this is Mostly lowercase.", "das ist ein schöner tag.",
                "12345", "ok", "hello 123 !!!", "ça va bien merci beaucoup mon ami."]
    elif iid == "punctuation:no_comma":
        out += ["No commas here.", "One, comma.", "Fullwidth，comma.", "Arabic، comma", "1,000"]
    if not out:
        raise ValueError(f"no adversarial responses for the instruction {iid!r}: add its cases")
    return out


def adversarial_responses(p: IFEvalPrompt) -> list[str]:
    """Responses that stress the checkers of ``p``'s instructions: each instruction's boundary cases
    (``_for_instruction``), each also wrapped the ways the loose variants undo (a first line, a last
    line, asterisks), plus blank and whitespace-only responses."""
    out = ["", "   \n\t", "\n"]
    for iid, kw in zip(p.instruction_ids, p.kwargs):
        for r in _for_instruction(iid, kw, p.prompt):
            out += [r, f"Sure, here it is:\n{r}", f"{r}\nI hope this helps!", f"**{r}**", f"Intro\n{r}\n*Outro*"]
    return list(dict.fromkeys(out))


# --- IFEval scoring both ways -----------------------------------------------------------------------

def ifeval_task(folder: Path, input_data: Path):
    """lm-eval's ifeval Task object over the local file, and its documents by key."""
    import logging

    from lm_eval.tasks import TaskManager

    # its checkers log an error for every text langdetect cannot classify (thousands here)
    logging.getLogger("lm_eval.tasks.ifeval.instructions").setLevel(logging.CRITICAL)

    from raftune.lmeval_tasks import write_ifeval_task

    name = write_ifeval_task(folder, input_data)
    task = TaskManager(include_path=str(folder), include_defaults=False).load([name])["tasks"][name]
    return task, {doc["key"]: doc for doc in task.test_docs()}


def lm_eval_verdicts(task, docs: dict, pairs: list[tuple[IFEvalPrompt, str]]) -> list[dict]:
    """lm-eval's verdicts per (prompt, response): {"strict": [...], "loose": [...]} per instruction."""
    out = []
    for p, response in pairs:
        r = task.process_results(docs[p.key], [response])
        out.append({"strict": list(r["inst_level_strict_acc"]), "loose": list(r["inst_level_loose_acc"]),
                    "prompt_strict": bool(r["prompt_level_strict_acc"]), "prompt_loose": bool(r["prompt_level_loose_acc"])})
    return out


def figures(per_prompt: list[dict]) -> dict:
    """The four accuracies from per-response verdicts ({"strict": [...], "loose": [...]})."""
    flat = {k: [v for r in per_prompt for v in r[k]] for k in KINDS}
    return {"prompt_strict": sum(all(r["strict"]) for r in per_prompt) / len(per_prompt),
            "instruction_strict": sum(flat["strict"]) / len(flat["strict"]),
            "prompt_loose": sum(all(r["loose"]) for r in per_prompt) / len(per_prompt),
            "instruction_loose": sum(flat["loose"]) / len(flat["loose"])}


def known_cause(iid: str, kw: dict) -> str | None:
    """Why the two scorers may disagree on this instruction whatever the response, or None."""
    if iid == "keywords:letter_frequency" and not ("a" <= kw["letter"].lower() <= "z"):
        return f"lm-eval swaps the letter {kw['letter']!r} for a random a-z letter"
    return None


def compare_ifeval(task, docs: dict, pairs: list[tuple[IFEvalPrompt, str]]) -> dict:
    """Both scorers on the same (prompt, response) pairs: their figures and every differing verdict."""
    t0 = time.perf_counter()
    ours = score([p for p, _ in pairs], [r for _, r in pairs])["per_prompt"]
    t1 = time.perf_counter()
    random.seed(0)  # lm-eval draws replacements for arguments it refuses from `random` (seeded 0 by simple_evaluate)
    theirs = lm_eval_verdicts(task, docs, pairs)
    t2 = time.perf_counter()
    diffs = []
    for (p, response), a, b in zip(pairs, ours, theirs):
        for i, (iid, kw) in enumerate(zip(p.instruction_ids, p.kwargs)):
            for kind in KINDS:
                if a[kind][i] != b[kind][i]:
                    diffs.append({"key": p.key, "instruction": iid, "kind": kind, "raftune": a[kind][i],
                                  "lm_eval": b[kind][i], "cause": known_cause(iid, kw),
                                  "response": response[:80]})
    return {"n_responses": len(pairs), "n_instructions": sum(len(p.instruction_ids) for p, _ in pairs),
            "raftune": figures(ours), "lm_eval": figures(theirs), "differences": diffs,
            "seconds": {"raftune": t1 - t0, "lm_eval": t2 - t1}}


def unseeded_flips(task, docs: dict, pairs: list[tuple[IFEvalPrompt, str]]) -> int:
    """Instruction verdicts that change between two lm-eval scorings with langdetect unseeded."""
    import langdetect

    saved = langdetect.DetectorFactory.seed
    try:
        runs = []
        for _ in range(2):
            langdetect.DetectorFactory.seed = None
            random.seed(0)
            runs.append(lm_eval_verdicts(task, docs, pairs))
    finally:
        langdetect.DetectorFactory.seed = saved
    return sum(x != y for a, b in zip(*runs) for k in KINDS for x, y in zip(a[k], b[k]))


def end_to_end_ifeval(folder: Path, prompts: list[IFEvalPrompt], responses: dict, args) -> dict | None:
    """lm-eval's simple_evaluate on the local task with RaftuneLM, same budget as the cached responses."""
    try:
        from raftune.lmeval import RaftuneLM
    except ImportError as e:
        print(f"end to end skipped: raftune.lmeval.RaftuneLM is not importable ({e})", file=sys.stderr)
        return None
    import lm_eval
    from lm_eval.tasks import TaskManager

    from raftune.lmeval_tasks import write_ifeval_task

    name = write_ifeval_task(folder, args.ifeval_data)
    lm = RaftuneLM(pretrained=args.model, dtype="fp32", batch_size=args.batch_size)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=str(folder),
                                  include_defaults=False), gen_kwargs={"max_gen_toks": args.max_new_tokens},
                                  limit=args.ifeval_limit, log_samples=True, apply_chat_template=True)
    seconds = time.perf_counter() - t0
    metrics = out["results"][name]
    by_key = {p.key: p for p in prompts}
    samples = out["samples"][name]
    theirs = {s["doc"]["key"]: s["resps"][0][0] for s in samples}
    keys = [s["doc"]["key"] for s in samples]
    same = sum(theirs[k].strip() == responses[k] for k in keys)
    ours = score([by_key[k] for k in keys], [theirs[k] for k in keys])
    diffs = []  # every instruction verdict lm-eval logged that raftune's scorer gives otherwise, on the same response
    for k, sample, mine in zip(keys, samples, ours["per_prompt"]):
        p = by_key[k]
        for kind in KINDS:
            for i, (iid, kw) in enumerate(zip(p.instruction_ids, p.kwargs)):
                if mine[kind][i] != sample[f"inst_level_{kind}_acc"][i]:
                    diffs.append({"key": k, "instruction": iid, "kind": kind, "raftune": mine[kind][i],
                                  "lm_eval": sample[f"inst_level_{kind}_acc"][i], "cause": known_cause(iid, kw),
                                  "response": theirs[k][:80]})
    return {"seconds": seconds, "n": len(keys), "same_responses": same, "differences": diffs,
            "lm_eval": {f: metrics[m] for f, m in zip(FIGURES, ("prompt_level_strict_acc,none", "inst_level_strict_acc,none",
                                                               "prompt_level_loose_acc,none", "inst_level_loose_acc,none"))},
            "raftune_on_same": {f: ours[f] for f in FIGURES},
            "first_different": next(({"key": k, "lm_eval": theirs[k][:120], "cached": responses[k][:120]}
                                     for k in keys if theirs[k].strip() != responses[k]), None)}


# --- MMLU -------------------------------------------------------------------------------------------

def lm_eval_mmlu(lm, folder: Path, names: list[str], shots: int) -> dict:
    """{task: [{"lls": [4 log-likelihoods], "predicted", "answer"}]} from lm-eval's logged samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=shots, log_samples=True,
                                  task_manager=TaskManager(include_path=str(folder), include_defaults=False))
    per_task = {}
    for name in names:
        rows = sorted(out["samples"][name], key=lambda s: s["doc_id"])
        per_task[name] = [{"lls": [float(r[0][0]) for r in s["resps"]], "answer": s["doc"]["answer"],
                           "acc": s["acc"]} for s in rows]
        for row in per_task[name]:
            row["predicted"] = max(range(4), key=lambda j: (row["lls"][j], -j))
    return per_task


def compare_mmlu(model, tok, args) -> list[dict]:
    """raftune's letter-form MMLU against lm-eval's hf backend and RaftuneLM, per shot count."""
    from lm_eval.models.huggingface import HFLM

    from raftune.lmeval_tasks import write_mmlu_task
    from raftune.mmlu import load_mmlu, score_mmlu

    subjects = args.mmlu_subjects.split(",")
    folder = Path(tempfile.mkdtemp(prefix="raftune-mmlu-tasks-"))
    names = write_mmlu_task(folder, args.mmlu_folder, subjects, limit=args.mmlu_limit)
    questions = load_mmlu(args.mmlu_folder, "test", subjects, limit_per_subject=args.mmlu_limit)
    backends = {"lm_eval_hf": lambda: HFLM(pretrained=model, tokenizer=tok, batch_size=args.mmlu_batch_size, device="cpu")}
    try:
        from raftune.lmeval import RaftuneLM

        backends["lm_eval_raftunelm"] = lambda: RaftuneLM.from_generator(_generator(model, tok, args), identity=args.model)
    except ImportError as e:
        print(f"RaftuneLM skipped for MMLU: {e}", file=sys.stderr)
    rows = []
    for shots in map(int, args.shots.split(",")):
        t0 = time.perf_counter()
        ours = score_mmlu(model, tok, questions, shots=shots, form="letter", folder=args.mmlu_folder,
                          batch_size=args.mmlu_batch_size)
        row = {"shots": shots, "n": len(questions), "raftune": {"accuracy": ours["accuracy"],
                                                                "seconds": time.perf_counter() - t0}}
        for backend, make in backends.items():
            t0 = time.perf_counter()
            theirs = lm_eval_mmlu(make(), folder, names, shots)
            flat = [r for name in names for r in theirs[name]]
            pairs = list(zip(ours["per_question"], flat))
            row[backend] = {
                "accuracy": sum(r["acc"] for r in flat) / len(flat),
                "seconds": time.perf_counter() - t0,
                "different_predictions": [i for i, (a, b) in enumerate(pairs) if a["predicted"] != b["predicted"]],
                "max_abs_ll_diff": max(abs(x - y) for a, b in pairs for x, y in zip(a["scores"], b["lls"])),
            }
            print(f"mmlu {shots}-shot {backend}: {json.dumps(row[backend])} (raftune {json.dumps(row['raftune'])})",
                  flush=True)
        rows.append(row)
    return rows


def _generator(model, tok, args):
    from raftune.generation import LocalGenerator

    return LocalGenerator(model, tok, args.model, batch_size=args.batch_size)


# --- main -------------------------------------------------------------------------------------------

def _print_ifeval(title: str, result: dict) -> None:
    print(f"\n{title}: {result['n_responses']} responses, {result['n_instructions']} instruction verdicts each way")
    print(f"{'':10}" + "".join(f"{f:>20}" for f in FIGURES))
    for who in ("raftune", "lm_eval"):
        print(f"{who:10}" + "".join(f"{result[who][f]:>20.4f}" for f in FIGURES))
    print(f"scoring time: raftune {result['seconds']['raftune']:.1f} s, lm-eval {result['seconds']['lm_eval']:.1f} s")
    _print_differences(result["differences"])


def _print_differences(diffs: list[dict]) -> None:
    print(f"differing instruction verdicts: {len(diffs)} "
          f"({sum(d['cause'] is not None for d in diffs)} with a known cause)")
    for d in diffs[:40]:
        print(f"  key {d['key']} {d['instruction']} {d['kind']}: raftune {d['raftune']} lm-eval {d['lm_eval']}"
              f" ({d['cause'] or 'unexplained'}) {d['response']!r}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ifeval-data", default=str(SHARED / "ifeval" / "input_data.jsonl"))
    p.add_argument("--ifeval-limit", type=int, default=None, help="end to end only: the first N prompts")
    p.add_argument("--mmlu-folder", default=str(SHARED / "mmlu"))
    p.add_argument("--mmlu-subjects", default="anatomy,formal_logic,nutrition")
    p.add_argument("--mmlu-limit", type=int, default=30)
    p.add_argument("--mmlu-batch-size", type=int, default=8)
    p.add_argument("--shots", default="0,5")
    p.add_argument("--model", default="default")
    p.add_argument("--max-new-tokens", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-end-to-end", action="store_true")
    p.add_argument("--skip-mmlu", action="store_true")
    p.add_argument("--json", default=None, help="also write every figure and difference here")
    args = p.parse_args()

    punkt_tab_nltk_dir()
    report: dict = {}
    prompts = load_ifeval(args.ifeval_data)
    folder = Path(tempfile.mkdtemp(prefix="raftune-ifeval-task-"))
    task, docs = ifeval_task(folder, Path(args.ifeval_data))

    t0 = time.perf_counter()
    responses = ifeval_responses(args.ifeval_data, args.model, args.max_new_tokens, args.batch_size)
    print(f"responses: {len(responses)} ({time.perf_counter() - t0:.0f} s, cached under {cache_dir() / 'bench'})")
    model_pairs = [(q, responses[q.key]) for q in prompts]
    report["ifeval_model"] = compare_ifeval(task, docs, model_pairs)
    _print_ifeval(f"IFEval, {args.model}'s greedy responses", report["ifeval_model"])
    report["ifeval_model"]["unseeded_langdetect_flips"] = unseeded_flips(task, docs, model_pairs)
    print(f"lm-eval unseeded (as lm-eval runs it), two scorings: "
          f"{report['ifeval_model']['unseeded_langdetect_flips']} verdicts changed")

    adversarial = [(q, r) for q in prompts for r in adversarial_responses(q)]
    report["ifeval_adversarial"] = compare_ifeval(task, docs, adversarial)
    _print_ifeval("IFEval, adversarial responses", report["ifeval_adversarial"])

    if not args.skip_end_to_end:
        e2e = end_to_end_ifeval(folder, prompts, responses, args)
        if e2e:
            report["ifeval_end_to_end"] = e2e
            print(f"\nend to end (lm-eval simple_evaluate, RaftuneLM, {e2e['n']} prompts, {e2e['seconds']:.0f} s): "
                  f"{e2e['same_responses']}/{e2e['n']} responses equal to the cached ones")
            for who in ("lm_eval", "raftune_on_same"):
                print(f"  {who:16}" + "".join(f"{e2e[who][f]:>20.4f}" for f in FIGURES))
            _print_differences(e2e["differences"])

    if not args.skip_mmlu:
        from raftune.models import load_model_and_tokenizer

        model, tok = load_model_and_tokenizer(args.model, dtype="fp32")
        report["mmlu"] = compare_mmlu(model, tok, args)
        print(f"\nMMLU letter form, {args.mmlu_subjects} x {args.mmlu_limit}")
        for row in report["mmlu"]:
            line = f"  {row['shots']}-shot n={row['n']}: raftune {row['raftune']['accuracy']:.4f} ({row['raftune']['seconds']:.0f} s)"
            for backend, r in row.items():
                if isinstance(r, dict) and "different_predictions" in r:
                    line += (f" | lm-eval {backend} {r['accuracy']:.4f} ({r['seconds']:.0f} s), "
                             f"{len(r['different_predictions'])} predictions differ, max |dLL| {r['max_abs_ll_diff']:.2e}")
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
