"""Where results go besides the log: metrics.jsonl and wandb (rank 0 only)."""
from __future__ import annotations

import json
import logging
import os
from typing import Optional

from omegaconf import OmegaConf

from .common import atomic_file, out_of_space, write_json_atomic

log = logging.getLogger(__name__)
# Metrics that are measurements of the machine, not of the training: they differ run to run.
MEASURED = ("tokens_per_s", "tokens_per_s_per_device", "step_s", "peak_mem_gb", "peak_mem_reserved_gb")


class MetricsLog:
    """metrics.jsonl in the run folder, and wandb when configured; rank 0 only."""

    def __init__(self, cfg, enabled: bool, fresh: bool):
        self.enabled = enabled
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        if enabled and fresh and os.path.exists(self.path):
            os.remove(self.path)
        self.wandb = None
        if enabled and cfg.logger.kind == "wandb":
            import wandb

            lc = cfg.logger
            self.wandb = wandb.init(project=lc.project, mode=lc.mode, group=lc.group, name=lc.run_name,
                                    dir=cfg.output_dir, config=OmegaConf.to_container(cfg, resolve=True))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_mixture(self, counts: list) -> None:
        """A mixed training set's examples per source: mixture.json beside metrics.jsonl, and the
        wandb run's summary (data/<source>/taken, .../examples)."""
        if not self.enabled:
            return
        write_json_atomic(os.path.join(os.path.dirname(self.path), "mixture.json"), counts, indent=1)
        if self.wandb is not None:
            self.wandb.summary.update({f"data/{c['source']}/{k}": c[k] for c in counts for k in ("taken", "examples")})

    def log_summary(self, values: dict) -> None:
        """Final figures: eval_summary.json beside metrics.jsonl, and the wandb run's summary."""
        if not self.enabled:
            return
        write_json_atomic(os.path.join(os.path.dirname(self.path), "eval_summary.json"), values, indent=1)
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def append_jsonl(path: str, record: dict) -> None:
    """One line at the end of `path` (a full disk: OutOfSpace; a torn line is dropped on resume)."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise out_of_space(path, e) or e from None


def keep_steps_up_to(path: str, step: int) -> None:
    """Drop the records of steps after `step` (run again after a resume), and a torn line left
    by a crash mid-write, atomically."""
    if not os.path.exists(path):
        return
    lines = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s:%d: dropping an unreadable line (a write cut short): %r", path, lineno, line[:80])
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                lines.append(line if line.endswith("\n") else line + "\n")
    with atomic_file(path) as f:
        f.writelines(lines)


def log_stage_summary(cfg, stage: str, summary: dict, folder: str, image: Optional[str] = None) -> None:
    """A stage's summary (and a plot) as a wandb run of its own in the run's group."""
    if cfg.logger.kind != "wandb":
        return
    import wandb

    lc = cfg.logger
    run = wandb.init(project=lc.project, mode=lc.mode, group=lc.group, dir=folder, job_type=stage,
                     name=f"{lc.run_name or cfg.method.name}-{stage}", config=OmegaConf.to_container(cfg, resolve=True))
    run.summary.update({f"{stage}/{k}": v for k, v in summary.items() if isinstance(v, (int, float, str))})
    if image:
        run.log({f"{stage}/plot": wandb.Image(image)})
    run.finish()
