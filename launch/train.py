"""Train: `python launch/train.py [overrides]`, `deepspeed [--num_gpus N] launch/train.py [overrides]`."""
from sftmix_ds.cli import train_main

if __name__ == "__main__":
    train_main()
