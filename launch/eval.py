"""Evaluate an exported model or the base model:
`python launch/eval.py eval=arith eval.model_path=outputs/sftmix-smollm2_135m-arith/model`
(or via deepspeed for several ranks). Writes OUTPUT_DIR/eval/eval.json and eval.md.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sftmix_ds.cli import hydra_entry  # noqa: E402
from sftmix_ds.config import validate  # noqa: E402
from sftmix_ds.eval import evaluate_model  # noqa: E402
from sftmix_ds.models import prepare_model  # noqa: E402


def main(cfg):
    validate(cfg)
    model_path = cfg.eval.model_path or prepare_model(cfg.model, cfg.model_cache_dir)
    evaluate_model(cfg, model_path, os.path.join(cfg.output_dir, "eval"))


if __name__ == "__main__":
    hydra_entry(main, config_name="eval")
