from .build import build_targets, leaks_prompt, read_done, targets_path
from .judges import LLMJudge, exact, numeric, parse_verdict, python_tests, resolve_judge
from .sandbox import run_python
