"""method.confidence_source=online, this project's variant of stage 1 (not the paper's): no
reference run; the training run's own first warm-up epoch(s) train plain NTP and are scored in
place at C evenly spaced steps, and the median split of -mean perplexity (as stage 1 makes it)
is published beside the other sources' and kept in every checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

from .split import confidence_records, summarize
from .stage import CONFIDENCE_FILE, publish_split


class OnlineSplit:
    def __init__(self, root: str, seed: int, run_digest: str = ""):
        """root: STAGE_DIR, where the split is published in a folder of its own, online-<fingerprint>;
        seed: the run's train.seed; run_digest: RunOptions.run_digest (the points of a sweep sharing
        STAGE_DIR each publish their own split)."""
        self.root, self.seed, self.run_digest = root, seed, run_digest
        self.ids: List[str] = []
        self.score_steps: List[int] = []
        self.scores: Dict[int, dict] = {}  # step -> {id: perplexity} at each scoring point reached
        self.split: Optional[dict] = None  # id -> confident | unconfident, once every point is scored

    def plan(self, ids: List[str], score_steps: List[int]) -> None:
        """The training examples' ids and the steps (1-based) to score them after."""
        self.ids, self.score_steps = ids, score_steps

    def due(self, step: int) -> bool:
        return step in self.score_steps and step not in self.scores

    def add(self, step: int, scores: dict) -> dict:
        """Perplexities after `step`; at the last scoring point the split is made and published.
        Returns metrics for the step's record."""
        self.scores[step] = scores
        if len(self.scores) < len(self.score_steps):
            return {}
        return {f"confidence/{k}": v for k, v in self._make_split(publish=True).items()}

    def state(self) -> dict:
        return {"online_scores": self.scores}

    def load_state(self, state: dict) -> None:
        self.scores = dict(state.get("online_scores", {}))
        if len(self.scores) == len(self.score_steps):
            self._make_split(publish=not os.path.exists(os.path.join(self.folder(), CONFIDENCE_FILE)))

    def fingerprint(self) -> str:
        identity = [self.seed, self.ids, self.score_steps, self.run_digest]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    def folder(self) -> str:
        return os.path.join(self.root, f"online-{self.fingerprint()}")

    def _make_split(self, publish: bool) -> dict:
        records = confidence_records([self.scores[s] for s in self.score_steps])
        self.split = {r["id"]: r["split"] for r in records}
        if publish:
            publish_split(records, self.folder(), self.fingerprint(),
                          {"source": "online", "scored_at_steps": self.score_steps})
        return summarize(records)
