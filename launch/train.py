"""Train: `python launch/train.py [overrides]`, `deepspeed [--num_gpus N] launch/train.py [overrides]`."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sftmix_ds.cli import hydra_entry  # noqa: E402
from sftmix_ds.trainer import train  # noqa: E402

if __name__ == "__main__":
    hydra_entry(train, config_name="train")
