from .checkpoint import CheckpointError, Checkpointer, complete_checkpoints, read_complete
from .collectives import BuildLockError, Collectives, after_rank0_wrote, dist_env
from .strategy import DeepSpeedStrategy
from .wrapper import PREFIX, LossModule, check_head, sample_ids
