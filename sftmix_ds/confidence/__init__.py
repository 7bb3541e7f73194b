from .split import (CONFIDENT, UNCONFIDENT, ConfidenceFileError, confidence_records, read_confidence_file,
                    write_confidence_file)
from .online import OnlineSplit
from .stage import run_confidence_stage, stage_root
