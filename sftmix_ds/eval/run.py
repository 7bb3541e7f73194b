"""Evaluate a model: judged task accuracy (in-domain and general ability, i.e. forgetting)
and held-out response perplexity; results as eval.json and eval.md in the output folder."""
from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
from typing import Optional

from ..common import atomic_file, write_json_atomic
from ..data import end_of_turn_token, load_conversations, load_split, require_final_answer
from ..engine import Collectives, after_rank0_wrote
from ..faults import maybe_disk_full
from ..inference import Generator, across_ranks, resolve_judge, score_model
from ..models import load_tokenizer
from .harness import check_tasks, run_harness

log = logging.getLogger(__name__)


def accuracy(conversations, generate, judge, on_ranks, answer_field: str = "answer") -> dict:
    """Greedy answers to each conversation's last prompt, judged against its gold answer."""
    prompts = [c.messages[:-1] for c in conversations]
    answers = on_ranks(prompts, generate)
    records = [{**c.record, "answer": c.record.get(answer_field, c.messages[-1]["content"])} for c in conversations]
    if "others" in inspect.signature(judge).parameters:  # a judge that rejects naming another question's answer
        judge = functools.partial(judge, others=sorted({str(r["answer"]) for r in records}))
    verdicts = on_ranks(list(zip(records, answers)), lambda share: [bool(judge(r, a)) for r, a in share])
    return {"accuracy": sum(verdicts) / max(len(verdicts), 1), "n": len(verdicts),
            "examples": [{"id": c.id, "answer": a, "correct": v} for c, a, v in zip(conversations, answers, verdicts)]}


def eval_sets(eval_cfg) -> list:
    """(group, task, conversations) of every judged evaluation set, checked: each conversation
    ends with its gold answer; and lm-eval's tasks, known and with their data. Cheap, so training
    runs it first to fail before, not after."""
    out = []
    for group in ("tasks", "general"):
        for task in eval_cfg[group]:
            convs = load_conversations(list(task.files), task.format)
            convs = convs[:task.limit] if task.limit else convs
            require_final_answer(convs, f"evaluation set {task.name!r} (its last turn is the gold answer)")
            out.append((group, task, convs))
    check_tasks(eval_cfg.harness)
    return out


def evaluate_model(cfg, model_path: str, out_dir: str, comm: Optional[Collectives] = None,
                   chat_template: Optional[str] = None) -> dict:
    """All ranks call this; rank 0 writes out_dir/eval.json and out_dir/eval.md. comm: this
    process's Collectives when it already has them (after training); chat_template: the base
    model's model.chat_template (an export carries the template it was trained with)."""
    e = cfg.eval
    comm = comm or Collectives(cfg.deepspeed, cfg.train.precision)
    on_ranks = lambda items, fn: across_ranks(items, fn, comm.world_size, comm.rank, comm.all_gather_object)
    results = {"model": model_path, "tasks": {}, "general": {}}
    sets = eval_sets(e)  # bad data or an lm-eval task without its data fails before a model loads
    generator = Generator(model_path, comm.device, comm.dtype, max_new_tokens=e.max_new_tokens,
                          batch_size=e.batch_size, chat_template=chat_template)
    for group, task, convs in sets:
        generate = lambda share, name=task.name: generator(share, desc=f"eval {name}")
        results[group][task.name] = accuracy(convs, generate, resolve_judge(task.judge, e.allow_unsandboxed_code),
                                             on_ranks, task.answer_field)
        log.info("eval %s: accuracy %.3f on %d", task.name, results[group][task.name]["accuracy"], len(convs))
    generator = None  # the generation model is released before scoring loads another copy
    if e.harness.tasks:
        results["harness"] = harness_on_rank0(e, model_path, chat_template, comm, out_dir)
    if e.perplexity_files:
        tokenizer, pad_id = load_tokenizer(model_path, chat_template)
        examples = load_split(cfg.data, tokenizer, e.perplexity_files, held_out=True)
        nll = score_model(cfg.deepspeed, cfg.train, comm, model_path, examples, batch_size=e.batch_size,
                          pad_id=pad_id, attn_implementation=cfg.model.attn_implementation, desc="eval perplexity")
        total, count = sum(s for s, _ in nll.values()), sum(c for _, c in nll.values())
        results["perplexity"] = {"perplexity": math.exp(total / count), "nll": total / count, "tokens": count,
                                 "n": len(nll)}
    log.info("eval:\n%s", markdown_table(results))  # before the files: a full disk loses no figure
    if comm.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with atomic_file(os.path.join(out_dir, "eval.json")) as f:
            maybe_disk_full(0, 0, "enospc_eval")
            json.dump(results, f, indent=1)
        with atomic_file(os.path.join(out_dir, "eval.md")) as f:
            f.write(markdown_table(results))
    return results


def harness_on_rank0(e, model_path: str, chat_template: Optional[str], comm: Collectives, out_dir: str) -> dict:
    """lm-eval on rank 0, the other ranks waiting at a barrier (bounded by deepspeed.timeout_minutes),
    then reading rank 0's results."""
    path = os.path.join(out_dir, "harness.json")
    if comm.rank == 0:
        tokenizer, _ = load_tokenizer(model_path, chat_template)
        results = run_harness(e.harness, model_path, tokenizer, comm.device, comm.dtype,
                              end_of_turn_token(tokenizer))
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(path, results, indent=1)
    after_rank0_wrote(path)
    if comm.rank != 0:
        with open(path) as f:
            results = json.load(f)
    return results


def markdown_table(results: dict) -> str:
    lines = [f"Model: `{results['model']}`", "", "| metric | value | n |", "|---|---|---|"]
    for group in ("tasks", "general"):
        for name, r in results[group].items():
            label = f"{name} accuracy" + (" (general)" if group == "general" else "")
            lines.append(f"| {label} | {r['accuracy']:.3f} | {r['n']} |")
    for task, r in results.get("harness", {}).items():
        stderr = f" ± {r['stderr']:.3f}" if r["stderr"] is not None else ""
        lines.append(f"| lm-eval {task} {r['metric']} ({r['filter']}) | {r['value']:.3f}{stderr} | {r['n']} |")
        for key, other in r["metrics"].items():  # the task's other metrics and filters
            if key != f"{r['metric']},{r['filter']}":
                stderr = f" ± {other['stderr']:.3f}" if other["stderr"] is not None else ""
                metric, filter_name = key.split(",", 1)
                lines.append(f"| lm-eval {task} {metric} ({filter_name}) | {other['value']:.3f}{stderr} | {r['n']} |")
    if "perplexity" in results:
        p = results["perplexity"]
        lines.append(f"| held-out perplexity | {p['perplexity']:.3f} | {p['n']} |")
    return "\n".join(lines) + "\n"
