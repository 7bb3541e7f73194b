"""Scoring pass: per-example response perplexity, inference only.

No gradients, no [tokens, vocab] logits kept: per-token log-probabilities are
computed chunk by chunk from the final hidden states and the LM head. Examples
are sorted by length to cut padding and batched up to a padded-token budget
(few large forward passes: with short examples a forward of a handful of rows
costs the host more than the device), the batches dealt round-robin to the
ranks, so every example is scored exactly once; results are gathered to every rank.
"""
from __future__ import annotations

import logging
import math
import time
from functools import partial
from typing import Dict, List, Sequence

import torch

from ..common import to_device
from ..data import Example, collate, example_ids, example_lengths
from ..data.batching import response_rows
from ..losses import Head, auto_chunk_rows, head_logits

log = logging.getLogger(__name__)


def token_nll(hidden: torch.Tensor, head: Head, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """-log p(target) for each row of hidden [M, d] under the model's head, in fp32, one [chunk, V]
    block at a time."""
    chunk_size = chunk_size or auto_chunk_rows(head.weight.shape[0], hidden.device)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk_size):
        z = head_logits(hidden[s:s + chunk_size], head)
        out[s:s + chunk_size] = torch.logsumexp(z, -1) - z.gather(1, targets[s:s + chunk_size, None]).squeeze(1)
    return out


def example_nll(hidden: torch.Tensor, head: Head, batch: dict, chunk_size: int = 0) -> dict:
    """Per-example sum of response-token NLL and response-token count; runs inside the engine's forward."""
    rows, targets, row_example = response_rows(hidden, batch)
    nll = token_nll(rows, head, targets, chunk_size)
    n = hidden.shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add_(0, row_example, nll)
    counts = torch.zeros(n, dtype=torch.long, device=hidden.device).index_add_(0, row_example,
                                                                               torch.ones_like(row_example))
    return {"nll_sum": sums, "count": counts}


def scoring_plan(examples: Sequence[Example], batch_size: int, world_size: int, rank: int,
                 max_tokens: int = 0) -> List[List[int]]:
    """This rank's batches of example indices, longest first: at most batch_size examples and (max_tokens
    > 0) at most max_tokens padded tokens each, one example at least. Every rank gets the same number
    of batches (short ranks get empty ones) so ZeRO-3's collectives line up."""
    lengths, ids = example_lengths(examples), example_ids(examples)
    batches: List[List[int]] = []
    for i in sorted(range(len(examples)), key=lambda i: (-lengths[i], ids[i])):
        last = batches[-1] if batches else None  # padded to its first (longest) example
        if last and len(last) < batch_size and (not max_tokens or (len(last) + 1) * lengths[last[0]] <= max_tokens):
            last.append(i)
        else:
            batches.append([i])
    mine = batches[rank::world_size]
    return mine + [[] for _ in range(math.ceil(len(batches) / world_size) - len(mine))]


def perplexities(nll: Dict[str, tuple]) -> Dict[str, float]:
    """{id: perplexity} from score_nll's {id: (summed NLL, count)}."""
    return {i: math.exp(s / c) for i, (s, c) in nll.items()}


def score(engine, comm, examples: Sequence[Example], batch_size: int, pad_id: int, progress=None,
          chunk_size: int = 0, max_tokens: int = 0) -> Dict[str, float]:
    """{id: perplexity} for every example, gathered from all ranks."""
    return perplexities(score_nll(engine, comm, examples, batch_size, pad_id, progress, chunk_size, max_tokens))


def score_nll(engine, comm, examples: Sequence[Example], batch_size: int, pad_id: int,
              progress=None, chunk_size: int = 0, max_tokens: int = 0) -> Dict[str, tuple]:
    """{id: (summed response-token NLL, response-token count)} for every example, from all ranks
    (each sequence-parallel group scores its share, each of its ranks one slice of every sequence).
    `engine` wraps a sftmix_ds LossModule (its own loss is not used: this one computes
    example_nll, so a training engine can score too); its train/eval mode is left as it was."""
    nll_terms = partial(example_nll, chunk_size=chunk_size)
    was_training = engine.training
    engine.eval()
    ids, sums, counts = [], [], []
    with torch.no_grad():
        for indices in scoring_plan(examples, batch_size, comm.data_parallel_size, comm.data_parallel_rank,
                                    max_tokens):
            batch = collate([examples[i] for i in indices] or [None], pad_id)
            out = engine(**to_device(batch, comm.device), loss_terms=nll_terms)
            ids += [examples[i].id for i in indices]
            sums.append(out["nll_sum"][:len(indices)])  # the results stay on the device until the last batch
            counts.append(out["count"][:len(indices)])
            if progress is not None:
                progress.update(1)
    engine.train(was_training)
    results = list(zip(ids, zip(torch.cat(sums).tolist(), torch.cat(counts).tolist()))) if ids else []
    gathered = comm.all_gather_object(results)
    nll = {}
    for i, (s, c) in (r for part in gathered for r in part):  # sequence parallelism: a part from each slice
        total = nll.get(i, (0.0, 0))
        nll[i] = (total[0] + s, total[1] + c)
    n_scored = sum(len(part) for part in gathered)
    if n_scored != len(examples) * comm.sequence_parallel or len(nll) != len(examples):
        raise RuntimeError(f"scoring covered {len(nll)} ids in {n_scored} results for {len(examples)} examples")
    return nll


def score_model(deepspeed_cfg, train_cfg, comm, model_path: str, examples: Sequence[Example], *, batch_size: int,
                pad_id: int, max_tokens: int = 0, attn_implementation: str = "auto",
                desc: str = "score") -> Dict[str, tuple]:
    """score_nll of a saved model: loaded into an inference engine (partitioned under ZeRO-3), its head
    checked against the loss's, scored with a progress bar, and released. Collective."""
    from tqdm import tqdm

    from ..engine import DeepSpeedStrategy, LossModule, check_head, sample_ids

    strategy = DeepSpeedStrategy(deepspeed_cfg, train_cfg, comm)
    engine = strategy.prepare_inference(LossModule(strategy.load_model(model_path, attn_implementation), example_nll,
                                                   strategy, padding_mask=train_cfg.padding_mask))
    check_head(engine, sample_ids(examples, comm.device), model_path)
    n_batches = len(scoring_plan(examples, batch_size, comm.data_parallel_size, comm.data_parallel_rank, max_tokens))
    started = time.perf_counter()
    with tqdm(total=n_batches, desc=desc, disable=comm.rank != 0) as bar:
        nll = score_nll(engine, comm, examples, batch_size, pad_id, progress=bar, chunk_size=train_cfg.loss_chunk_size,
                        max_tokens=max_tokens)
    tokens, elapsed = sum(example_lengths(examples)), time.perf_counter() - started
    log.info("%s: %d examples, %d tokens, %d forward passes a rank, in %.2f s: %.0f tokens/s per device", desc,
             len(examples), tokens, n_batches, elapsed, tokens / elapsed / comm.world_size)
    strategy.release()
    return nll
