"""S3FT target building (Gupta et al., arXiv 2502.08130), with the base model before any training:

    y_hat = M0(x);                 judged correct -> target y_hat        (source "own")
    else y_til = M0(paraphrase(x, y)); no leak and judged correct -> y_til ("paraphrase")
    else y                                                               ("gold")

The target replaces the final assistant turn; earlier turns stay as they are.
Records are appended to the targets file chunk by chunk (flushed), so a
re-run after a crash continues with the ids not yet written.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from typing import List

from ..data import DataError, require_final_answer, train_conversations
from ..engine import Collectives, dist_env
from ..models import prepare_model
from ..tracking import log_stage_summary
from ..common import atomic_file, write_json_atomic
from ..inference import Generator, LLMJudge, across_ranks, resolve_judge

log = logging.getLogger(__name__)
SOURCES = ("own", "paraphrase", "gold")
LEAK = re.compile(r"reference answer|your response|original answer|(given|provided) answer|rewrit|paraphras|"
                  r"in (my|your) own words", re.I)


def leaks_prompt(text: str) -> bool:
    """A paraphrase that talks about the task it was given rather than answering."""
    return bool(LEAK.search(text or ""))


def targets_path(cfg) -> str:
    return cfg.method.targets_file or os.path.join(cfg.output_dir, "s3ft", "targets.jsonl")


def read_done(path: str) -> dict:
    """id -> record of a targets file; a torn last line (a crash mid-write) is ignored."""
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done[record["id"]] = record
    return done


def check_targets_match(path: str, conversations) -> None:
    """A targets file holds one record per training example, no more, no fewer."""
    have, want = set(read_done(path)), {c.id for c in conversations}
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        raise DataError(f"{path}: the S3FT targets do not match the training data: {len(missing)} of its "
                        f"{len(want)} ids missing{f' (e.g. {missing[:3]})' if missing else ''}, {len(extra)} ids "
                        f"not in the data{f' (e.g. {extra[:3]})' if extra else ''}; build the targets for this "
                        "data (leave method.targets_file unset) or point method.targets_file at the right file")


def build_targets(cfg) -> str:
    """Write (or complete) the targets file for cfg's training data; returns its path."""
    m, d = cfg.method, cfg.data
    rank, _, world = dist_env()
    path = targets_path(cfg)
    conversations = train_conversations(d)
    require_final_answer(conversations, "S3FT (its target replaces the last assistant turn)")
    done = read_done(path)
    pending = [c for c in conversations if c.id not in done]
    log.info("s3ft: %d examples, %d already built, %d pending in %s", len(conversations), len(done),
             len(pending), path)
    if pending:
        comm = Collectives(cfg.deepspeed, cfg.train.precision)
        generator = Generator(prepare_model(cfg.model, cfg.model_cache_dir), comm.device, comm.dtype,
                              max_new_tokens=m.max_new_tokens, do_sample=m.do_sample, temperature=m.temperature,
                              top_p=m.top_p, stop_strings=list(m.stop_strings), batch_size=m.generate_batch_size,
                              chat_template=cfg.model.chat_template)
        on_ranks = lambda items, fn: across_ranks(items, fn, world, rank, comm.all_gather_object)
        judge = make_judge(d.judge, generator, m.judge_prompt, on_ranks, m.allow_unsandboxed_code)
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if done:  # drop a torn last line left by a crash, so appends start on a fresh line
                with atomic_file(path) as f:
                    f.writelines(json.dumps(r) + "\n" for r in done.values())
        for start in range(0, len(pending), m.write_every):
            records = build_chunk(pending[start:start + m.write_every], m, d, generator, judge, on_ranks)
            if rank == 0:
                with open(path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
                    f.flush()
                    os.fsync(f.fileno())
            comm.barrier()
        del generator
    check_targets_match(path, conversations)
    done = read_done(path)
    mix = Counter(r["source"] for r in done.values())
    share = {s: mix[s] / max(len(done), 1) for s in SOURCES}
    log.info("s3ft targets: %s", ", ".join(f"{s} {mix[s]} ({100 * share[s]:.1f}%)" for s in SOURCES))
    if rank == 0:
        folder = os.path.dirname(os.path.abspath(path))
        write_json_atomic(os.path.join(folder, "mix.json"), {"counts": {s: mix[s] for s in SOURCES}, "share": share},
                          indent=1)
        log_stage_summary(cfg, "s3ft", {**{f"count_{s}": mix[s] for s in SOURCES},
                                        **{f"share_{s}": share[s] for s in SOURCES}}, folder)
    return path


def make_judge(name: str, generator: Generator, judge_prompt: str, on_ranks, allow_unsandboxed_code: bool = False):
    """judge(items) -> verdicts for (record, question, candidate) items, spread over ranks."""
    if name == "llm":
        llm = LLMJudge(lambda prompts: generator(prompts, desc="judge"), judge_prompt)
        check = lambda share: llm.judge_many([(q, r["answer"], c) for r, q, c in share])
    else:
        fn = resolve_judge(name, allow_unsandboxed_code)
        check = lambda share: [bool(fn(r, c)) for r, _, c in share]
    # An empty answer is never a target, whatever the judge says.
    return lambda items: [ok and bool(c.strip()) for ok, (_, _, c) in zip(on_ranks(items, check), items)]


def build_chunk(conversations, m, d, generator: Generator, judge, on_ranks) -> List[dict]:
    prompts = [c.messages[:-1] for c in conversations]
    questions = [c.messages[-2]["content"] for c in conversations]
    golds = [c.messages[-1]["content"] for c in conversations]
    records = [{**c.record, "answer": c.record.get(d.answer_field, gold)} if isinstance(c.record, dict)
               else {"answer": gold} for c, gold in zip(conversations, golds)]
    first_user = [p[:-1] + [{"role": "user", "content": m.generation_prompt.format(question=q)}]
                  for p, q in zip(prompts, questions)]
    own = on_ranks(first_user, lambda share: generator(share, desc="own answers"))
    own_ok = judge(list(zip(records, questions, own)))
    retry = [i for i, ok in enumerate(own_ok) if not ok]
    para = on_ranks([prompts[i][:-1] + [{"role": "user", "content": m.paraphrase_prompt.format(
        question=questions[i], gold=golds[i])}] for i in retry], lambda share: generator(share, desc="paraphrases"))
    leak = [leaks_prompt(p) for p in para]
    verdicts = judge([(records[i], questions[i], p) for i, p, bad in zip(retry, para, leak) if not bad])
    para_ok, it = {}, iter(verdicts)
    for i, p, bad in zip(retry, para, leak):
        para_ok[i] = (p, bad, False if bad else next(it))
    out = []
    for i, conv in enumerate(conversations):
        paraphrase, leaked, p_ok = para_ok.get(i, (None, False, False))
        source = "own" if own_ok[i] else "paraphrase" if p_ok else "gold"
        target = {"own": own[i], "paraphrase": paraphrase, "gold": golds[i]}[source]
        out.append({"id": conv.id, "messages": prompts[i] + [{"role": "assistant", "content": target}],
                    "source": source, "gold": golds[i], "answer": records[i]["answer"], "own": own[i],
                    "own_correct": bool(own_ok[i]),
                    "paraphrase": paraphrase, "paraphrase_leaked": leaked, "paraphrase_correct": bool(p_ok)})
    return out
