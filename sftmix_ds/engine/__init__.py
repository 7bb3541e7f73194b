from .strategy import DeepSpeedStrategy, complete_checkpoints, dist_env
from .wrapper import PREFIX, LossModule
