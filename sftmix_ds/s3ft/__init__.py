from .build import build_targets, check_targets_match, leaks_prompt, read_done, targets_path
