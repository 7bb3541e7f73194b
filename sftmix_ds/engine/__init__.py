from .checkpoint import CheckpointError, Checkpointer, complete_checkpoints, read_complete
from .collectives import BuildLockError, Collectives, after_rank0_wrote, dist_env
from .sequence import check_data_parallel, check_sequence_parallel
from .strategy import DeepSpeedStrategy
from .wrapper import PREFIX, LossModule, check_head, sample_ids
