from .strategy import (BuildLockError, CheckpointError, DeepSpeedStrategy, complete_checkpoints, dist_env,
                       read_complete)
from .wrapper import PREFIX, LossModule, check_head, sample_ids
