"""SFTMix stage 1 alone: `python launch/score.py [overrides]` or `deepspeed launch/score.py ...`.

Writes OUTPUT_DIR/confidence/<fingerprint>/confidence.jsonl (one record per
example id: per-checkpoint perplexities, confidence, split), a histogram PNG
and summary.json. method.score_checkpoints=[a,b] scores given model folders
instead of training a reference run.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sftmix_ds.cli import hydra_entry  # noqa: E402
from sftmix_ds.confidence import run_confidence_stage  # noqa: E402
from sftmix_ds.config import validate  # noqa: E402


def main(cfg):
    validate(cfg)
    print(run_confidence_stage(cfg))


if __name__ == "__main__":
    hydra_entry(main, config_name="score")
