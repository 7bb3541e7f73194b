"""What confidence scoring, S3FT and evaluation share, below all three: response-NLL
scoring, batched generation, judges and the code sandbox. Nothing here trains."""
from .generate import Generator, across_ranks
from .judges import JUDGE_PROMPT, LLMJudge, check_judge_name, resolve_judge
from .sandbox import SandboxResult, run_python
from .scoring import example_nll, perplexities, score, score_model, score_nll, scoring_plan, token_nll
