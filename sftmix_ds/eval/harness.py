"""EleutherAI's lm-evaluation-harness on a model folder, in-process: the project's held-out sets
shipped as lm-eval tasks (lm_eval_tasks/), any task folder the user names, and lm-eval's own tasks
by name where their data can be had. One rank runs it (lm-eval's data parallelism needs its own
launcher); the others wait for its results file."""
from __future__ import annotations

import difflib
import logging
import os
from typing import List, Optional

from ..common import ConfigError, UserError
from ..data import DataError

log = logging.getLogger(__name__)
SHIPPED_TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")


def task_manager(include_path: List[str]):
    from lm_eval.tasks import TaskManager

    for path in include_path:
        if not os.path.isdir(path):
            raise ConfigError(f"eval.harness.include_path: {path!r} is not a folder of lm-eval task YAMLs")
    return TaskManager(include_path=[SHIPPED_TASKS, *include_path])


def check_tasks(harness_cfg) -> None:
    """Every task is known and its data can be loaded (offline: is in the datasets cache), before any
    model is: an unknown name or missing data is an error naming the task and what to do."""
    tasks, include_path = list(harness_cfg.tasks), list(harness_cfg.include_path)
    if not tasks:
        return
    manager = task_manager(include_path)
    for name in tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            raise ConfigError(f"eval.harness.tasks: no lm-eval task or group {name!r}"
                              + (f" (close: {', '.join(close)})" if close else "")
                              + f"; the shipped ones are {', '.join(shipped_tasks())}; eval.harness.include_path "
                              "adds a folder of task YAMLs")
    for name in tasks:
        try:
            manager.load([name])  # builds each task, which loads its data
        except Exception as e:  # lm-eval and datasets raise many types: network, missing files, bad YAML
            import datasets

            offline = datasets.config.HF_HUB_OFFLINE
            hint = (f"this machine is offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE): fill the datasets cache "
                    f"({datasets.config.HF_DATASETS_CACHE}) by running this task once where there is network, "
                    "with the same HF_DATASETS_CACHE" if offline else "check its data files and the network")
            raise DataError(f"eval.harness.tasks: task {name!r} cannot load its data ({type(e).__name__}: "
                            f"{str(e)[:300]}); {hint}") from None


def shipped_tasks() -> List[str]:
    return sorted(f[:-5] for f in os.listdir(SHIPPED_TASKS) if f.endswith(".yaml") and not f.startswith("_"))


def run_harness(harness_cfg, model_path: str, tokenizer, device, dtype, end_of_turn: Optional[str]) -> dict:
    """{task: {metric, value, stderr, n, filter, metrics, samples: [{id, response, extracted, target, correct}]}}:
    the task's first metric and filter, and in `metrics` every metric and filter it reports
    ({"metric,filter": {value, stderr}}); each question rendered with the model's chat template as its
    one user turn, generated with the task's own settings (its max_gen_toks, until, few-shot) under
    eval.harness.gen_kwargs, and stopped at the template's end of turn too (check_tasks has vetted the
    tasks first)."""
    import lm_eval
    from transformers import AutoModelForCausalLM

    # A loaded model, not a path: from a path HFLM starts accelerate, which would join (or, from the
    # launcher's environment, try to start) a process group the other ranks are not part of.
    network = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else None
    model = end_of_turn_lm(network, tokenizer, harness_cfg.batch_size, end_id)
    try:
        out = lm_eval.simple_evaluate(model=model, tasks=list(harness_cfg.tasks),
                                      task_manager=task_manager(list(harness_cfg.include_path)),
                                      apply_chat_template=True, gen_kwargs=dict(harness_cfg.gen_kwargs) or None,
                                      limit=harness_cfg.limit or None, log_samples=True, random_seed=0,
                                      numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    except Exception as e:
        raise UserError(f"lm-eval failed on {model_path} ({type(e).__name__}: {e})") from e
    results = {}
    for task, values in out["results"].items():
        metrics = [k for k in values if "," in k and not k.split(",")[0].endswith("_stderr")]
        if not metrics:  # a group's row without its own aggregate
            continue
        key = metrics[0]
        metric, filter_name = key.split(",", 1)
        samples = [{"id": s["doc"].get("id", s["doc_id"]), "response": s["resps"][0][0],
                    "extracted": s["filtered_resps"][0], "target": s["target"], "correct": bool(s[metric])}
                   for s in out.get("samples", {}).get(task, []) if s.get("filter") == filter_name]
        every = {k: {"value": values[k], "stderr": _stderr(values, k)} for k in metrics}
        results[task] = {"metric": metric, "filter": filter_name, "value": values[key], "stderr": _stderr(values, key),
                         "n": out.get("n-samples", {}).get(task, {}).get("effective", len(samples)),
                         "metrics": every, "samples": samples}
        log.info("lm-eval %s: %s", task, ", ".join(f"{k} {v['value']:.3f}" for k, v in every.items()))
    return results


def _stderr(values: dict, key: str) -> Optional[float]:
    metric, filter_name = key.split(",", 1)
    stderr = values.get(f"{metric}_stderr,{filter_name}")
    return stderr if isinstance(stderr, float) else None


def end_of_turn_lm(network, tokenizer, batch_size: int, end_of_turn_id: Optional[int]):
    """lm-eval's HFLM on a loaded model, whose generation also stops at the chat template's end of turn
    (<|eot_id|>, <end_of_turn>...): lm-eval stops at the tokenizer's end of sequence, which for some
    templates is another token."""
    from lm_eval.models.huggingface import HFLM

    class EndOfTurnHFLM(HFLM):
        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id if end_of_turn_id is None else end_of_turn_id

        @property
        def prefix_token_id(self) -> int:  # loglikelihood contexts keep lm-eval's own choice
            if self.custom_prefix_token_id is not None:
                return self.custom_prefix_token_id
            return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else \
                self.tokenizer.eos_token_id

    return EndOfTurnHFLM(pretrained=network, tokenizer=tokenizer, batch_size=batch_size)
