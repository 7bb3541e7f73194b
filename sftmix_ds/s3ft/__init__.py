from .build import build_targets, leaks_prompt, read_done, targets_path
