"""What every entry point in launch/ shares: argv clean-up, Hydra, clean errors."""
from __future__ import annotations

import logging
import os
import re
import sys



def strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N (or --local_rank N); Hydra would
    reject it. LOCAL_RANK in the environment carries the same information."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        match = re.fullmatch(r"--local[_-]rank(=(\d+))?", arg)
        if match:
            os.environ.setdefault("LOCAL_RANK", match.group(2) or "0")
            skip = match.group(1) is None
            continue
        out.append(arg)
    return out


def hydra_entry(fn, config_name: str) -> None:
    """Run fn(cfg) under Hydra; bad config or data ends with one clear line, exit code 2."""
    import hydra

    from .config import CONF_DIR, ConfigError, register_configs
    from .data import DataError
    from .engine import CheckpointError
    from .trainer import NumericalError

    sys.argv = strip_local_rank(sys.argv)
    register_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def main(cfg):
        from .engine import dist_env
        from .trainer import setup_logging

        setup_logging(dist_env()[0], cfg.output_dir)
        try:
            return fn(cfg)
        except (ConfigError, DataError, NumericalError, CheckpointError) as e:
            logging.getLogger("sftmix_ds").error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    main()
