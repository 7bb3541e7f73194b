from .strategy import CheckpointError, DeepSpeedStrategy, complete_checkpoints, dist_env
from .wrapper import PREFIX, LossModule
