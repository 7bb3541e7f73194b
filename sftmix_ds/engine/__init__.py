from .checkpoint import CheckpointError, Checkpointer, complete_checkpoints, read_complete
from .collectives import BuildLockError, Collectives, barrier_if_initialized, dist_env
from .strategy import DeepSpeedStrategy
from .wrapper import PREFIX, LossModule, check_head, sample_ids
