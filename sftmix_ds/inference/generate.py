"""Batched generation with the KV cache: left padding, length-sorted batches, work dealt across ranks.

Each rank loads the base model whole (unpartitioned) for generation, which
suits models that fit on one device; every prompt is generated exactly once
and the results are gathered to every rank in input order.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from tqdm import tqdm


class Generator:
    def __init__(self, model_path: str, device, dtype, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_strings: Sequence[str] = (),
                 batch_size: int = 16, chat_template: Optional[str] = None):
        from transformers import AutoModelForCausalLM

        from ..data import end_of_turn_token
        from ..models import load_tokenizer

        self.tokenizer, pad_id = load_tokenizer(model_path, chat_template, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        self.device, self.batch_size, self.stop_strings = device, batch_size, list(stop_strings)
        self.pad_id = pad_id
        self.new_tokens = 0  # tokens the last call generated (padding not counted)
        end_of_turn = end_of_turn_token(self.tokenizer)
        self.kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True, pad_token_id=pad_id,
                           eos_token_id=stop_ids(self.model.generation_config.eos_token_id,
                                                 end_of_turn and self.tokenizer.convert_tokens_to_ids(end_of_turn)))
        if do_sample:
            self.kwargs.update(temperature=temperature, top_p=top_p)

    def render(self, prompt) -> str:
        """A user message (str) or a list of messages -> the chat-templated prompt text."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        from ..data.tokenize import render_chat

        return render_chat(self.tokenizer, messages, "a generation prompt", tokenize=False, add_generation_prompt=True)

    def cut_at_stop(self, text: str) -> str:
        for stop in self.stop_strings:
            text = text.split(stop)[0]
        return text.strip()

    @torch.no_grad()
    def __call__(self, prompts: Sequence, desc: str = "generate", progress: bool = True) -> List[str]:
        texts = [self.render(p) for p in prompts]
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: List[str] = [""] * len(texts)
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        self.new_tokens = 0
        for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
            enc = self.tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            extra = {"stop_strings": self.stop_strings, "tokenizer": self.tokenizer} if self.stop_strings else {}
            generated = self.model.generate(**enc, **self.kwargs, **extra)
            self.new_tokens += int((generated[:, enc["input_ids"].shape[1]:] != self.pad_id).sum())
            for i, row in zip(batch, generated[:, enc["input_ids"].shape[1]:]):
                out[i] = self.cut_at_stop(self.tokenizer.decode(row, skip_special_tokens=True))
        return out


def stop_ids(configured, end_of_turn: Optional[int]) -> List[int]:
    """generation_config's eos ids plus the chat template's end-of-turn token: Gemma's config names
    only <eos>, yet its turns end with <end_of_turn>."""
    ids = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
    return ids + [end_of_turn] if end_of_turn is not None and end_of_turn not in ids else ids


def across_ranks(items: Sequence, fn: Callable[[list], list], world_size: int, rank: int, all_gather) -> list:
    """fn applied to this rank's share of items (dealt round-robin after sorting by size),
    results gathered from all ranks back into the order of items."""
    order = sorted(range(len(items)), key=lambda i: -len(str(items[i])))
    mine = order[rank::world_size]
    results = fn([items[i] for i in mine]) if mine else []
    merged: list = [None] * len(items)
    for part in all_gather(list(zip(mine, results))):
        for i, value in part:
            merged[i] = value
    return merged
