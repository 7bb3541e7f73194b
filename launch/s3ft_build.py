"""S3FT target building alone: `python launch/s3ft_build.py data=gsm [overrides]` (or via deepspeed).

Writes OUTPUT_DIR/s3ft/targets.jsonl (or method.targets_file): for every id the
chat messages with the chosen target, its source (own | paraphrase | gold) and
the raw generations; mix.json beside it holds the share of each source.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sftmix_ds.cli import hydra_entry  # noqa: E402
from sftmix_ds.config import validate  # noqa: E402
from sftmix_ds.s3ft import build_targets  # noqa: E402


def main(cfg):
    validate(cfg)
    print(build_targets(cfg))


if __name__ == "__main__":
    hydra_entry(main, config_name="s3ft_build")
