"""Where results go besides the log: metrics.jsonl and wandb (rank 0 only)."""
from __future__ import annotations

import json
import os
from typing import Optional

from omegaconf import OmegaConf


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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


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
