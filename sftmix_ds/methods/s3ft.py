"""S3FT (Gupta et al., arXiv 2502.08130): plain SFT on targets the base model already
produces when it is right (own answers, else judged paraphrases of the gold, else gold)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..config import ConfigError, in_range, positive
from ..data import load_split, train_conversations
from ..inference import JUDGE_PROMPT, check_judge_name
from ..s3ft import build_targets, check_targets_match
from .base import MethodConfig
from .ntp import NTP

PARAPHRASE_PROMPT = """Here is a question and its answer.

Question:
{question}

Answer:
{gold}

Write the same answer again in your own style, keeping every step and the final answer exactly as they are. \
Reply with the answer only."""


@dataclass
class S3FTConfig(MethodConfig):
    name: str = "s3ft"
    _target_: str = "sftmix_ds.methods.s3ft.S3FT"
    # A targets file from an earlier build (launch/s3ft_build.py) skips the build.
    targets_file: Optional[str] = None
    generation_prompt: str = "{question}"
    paraphrase_prompt: str = PARAPHRASE_PROMPT
    judge_prompt: str = JUDGE_PROMPT
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: List[str] = field(default_factory=list)
    generate_batch_size: int = 16
    write_every: int = 64  # examples per appended chunk of the targets file
    # python_tests on a machine that cannot sandbox code (no root, no user namespaces): run it anyway.
    allow_unsandboxed_code: bool = False


class S3FT(NTP):
    config_class = S3FTConfig

    @staticmethod
    def check_config(cfg) -> None:
        m = cfg.method
        if cfg.data.weights:
            raise ConfigError("data.weights: method=s3ft builds its targets from every training example once; "
                              "a mixture is not supported with it")
        for key in ("max_new_tokens", "generate_batch_size", "write_every", "temperature"):
            positive(f"method.{key}", m[key])
        in_range("method.top_p", m.top_p, 0, 1, low_open=True)
        try:
            check_judge_name(cfg.data.judge, llm_ok=True, allow_unsandboxed_code=m.allow_unsandboxed_code)
        except ValueError as e:
            raise ConfigError(f"data.judge={cfg.data.judge!r}: {e}") from None
        for key, fields in (("paraphrase_prompt", ("{question}", "{gold}")), ("generation_prompt", ("{question}",)),
                            ("judge_prompt", ("{question}", "{gold}", "{candidate}"))):
            missing = [f for f in fields if f not in m[key]]
            if missing:
                raise ConfigError(f"method.{key}: must contain {', '.join(missing)}")

    def before_training(self, cfg, train_set, tokenizer):
        if cfg.method.targets_file:
            conversations = train_conversations(cfg.data)
            check_targets_match(cfg.method.targets_file, conversations)
        path = cfg.method.targets_file or build_targets(cfg)
        data = cfg.data.copy()
        data.format = "chat"
        data.system_prompt = None  # the targets keep the messages the build used
        data.columns = {}
        return load_split(data, tokenizer, [path])
