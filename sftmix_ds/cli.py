"""The entry points (launch/*.py and the console scripts of setup.py) and what they share:
argv clean-up, Hydra, clean errors."""
from __future__ import annotations

import logging
import os
import re
import sys
import warnings


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


def check_signal_delay(launcher) -> None:
    """A Slurm sweep point's time-limit signal must come after it starts (hydra.launcher of submitit)."""
    from .common import ConfigError

    delay, limit = launcher.get("signal_delay_s"), launcher.get("timeout_min")
    if delay is not None and limit is not None and delay >= 60 * limit:
        raise ConfigError(f"hydra.launcher.signal_delay_s={delay}: Slurm would send the time-limit signal as soon as "
                          f"each point starts (hydra.launcher.timeout_min={limit}), and the point would be requeued "
                          "until hydra.launcher.max_num_timeout runs out; give a signal delay below the time limit")


def in_sweep(cfg) -> None:
    """In a Hydra multirun (-m), each point writes to its own sweep folder (hydra.sweep.dir/N),
    with its overrides beside it; its wandb run joins the sweep's group; SFTMix points share
    stage-1 outputs in hydra.sweep.dir/confidence."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return
    check_signal_delay(hc.launcher)
    with open_dict(cfg):
        cfg.output_dir = hc.runtime.output_dir
        if cfg.logger.group is None:
            cfg.logger.group = os.path.basename(os.path.normpath(hc.sweep.dir))
        if "stage_dir" in cfg.method and cfg.method.stage_dir is None:
            # SFTMix's stage 1 is keyed by its own fingerprint: points that share it compute it once.
            cfg.method.stage_dir = os.path.join(hc.sweep.dir, "confidence")
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "overrides.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(list(hc.overrides.task)))


def setup_logging(rank: int, output_dir: str) -> None:
    handlers = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "train.log")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s")
    for noisy in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # DeepSpeed still calls collectives that torch marks deprecated, on every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def missing_value_message(error) -> str:
    """A required config value left unset (???), named by its key."""
    found = re.search(r"Missing mandatory value: (\S+)", str(error))
    key = found.group(1) if found else getattr(error, "full_key", "?")
    return f"{key}: required and not set; give it on the command line ({key}=...)"


def exit_now(code: int) -> None:
    """End the process as Python's own exit would, in its order (threads' exit hooks, which stop thread
    pools such as torch.compile's, then the other threads joined; exit handlers; logs and streams flushed),
    but without the interpreter's teardown: freeing torch's, transformers' and DeepSpeed's modules takes
    another 0.5-1.5 s in every process, after all the work is written."""
    import atexit
    import threading

    threading._shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def hydra_entry(fn, config_name: str) -> None:
    """Run fn(cfg) under Hydra; bad config or data ends with one clear line, exit code 2."""
    import hydra

    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    from .common import Preempted, UserError
    from .config import CONF_DIR, check_output_dir, register_configs

    sys.argv = strip_local_rank(sys.argv)
    register_configs()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def main(cfg):
        from .engine import dist_env

        try:
            in_sweep(cfg)
            check_output_dir(cfg.output_dir)
            setup_logging(dist_env()[0], cfg.output_dir)
            return fn(cfg)
        except Preempted as e:
            logging.getLogger("sftmix_ds").info("%s", e)
            exit_now(0)
        except (UserError, MissingMandatoryValue, InterpolationToMissingValueError) as e:
            message = str(e) if isinstance(e, UserError) else missing_value_message(e)
            logging.getLogger("sftmix_ds").error("%s", message)
            print(f"error: {message}", file=sys.stderr)
            exit_now(2)
        except Exception:
            # A collective that failed because a peer is gone says so, naming it (engine/peers.py).
            from .engine.peers import current_watch

            if current_watch() is not None:
                current_watch().report_if_peer_lost()
            raise

    main()
    exit_now(0)


def _train(cfg):
    from .trainer import train

    return train(cfg)


def _score(cfg):
    from .config import validate
    from .confidence import run_confidence_stage

    validate(cfg)
    print(run_confidence_stage(cfg))


def _s3ft_build(cfg):
    from .config import validate
    from .s3ft import build_targets

    validate(cfg)
    print(build_targets(cfg))


def _evaluate(cfg):
    from .config import validate
    from .eval import evaluate_model
    from .models import prepare_model

    validate(cfg)
    from .config import path_tag

    # One folder per evaluated model: the base model's and each export's results sit side by side.
    if cfg.eval.model_path:
        evaluate_model(cfg, cfg.eval.model_path, os.path.join(cfg.output_dir, "eval", path_tag(cfg.eval.model_path)))
    else:
        evaluate_model(cfg, prepare_model(cfg.model, cfg.model_cache_dir), os.path.join(cfg.output_dir, "eval", "base"),
                       chat_template=cfg.model.chat_template)


def train_main() -> None:
    hydra_entry(_train, config_name="train")


def score_main() -> None:
    hydra_entry(_score, config_name="score")


def s3ft_build_main() -> None:
    hydra_entry(_s3ft_build, config_name="s3ft_build")


def eval_main() -> None:
    hydra_entry(_evaluate, config_name="eval")
