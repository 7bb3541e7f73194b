"""What identifies a run's math, in one place for resume and for every stage fingerprint: the
settings that do not change it, and the digest of the training examples."""
from __future__ import annotations

import hashlib

# Speed switches, with the value a fingerprint records for each (its default; for attention, sdpa,
# what the default "auto" picks for Llama models, so older fingerprints hold): tested to leave losses
# and weights unchanged (the layout test in tests/test_train_e2e.py), so a resumed run may change them
# and a stage fingerprint ignores them.
SPEED_SWITCHES = {"train.gradient_checkpointing": False, "train.compile": False, "train.loss_backend": "auto",
                  "train.loss_chunk_size": 0, "train.pad_to_multiple_of": 0, "train.padding_mask": False,
                  "model.attn_implementation": "sdpa", "deepspeed.gather_per_block": True}


def examples_hash(examples) -> "hashlib._Hash":
    """A sha256 fed with the digest of the examples' ids, token ids and labels, in order (a token
    store's is recorded when it is built; more may be fed after)."""
    from .data.store import examples_digest

    return hashlib.sha256(examples_digest(examples).encode())


def without_speed_switches(section: str, settings: dict) -> dict:
    """A config section (`train`, `model`) as a plain dict with its speed switches at their defaults,
    so fingerprints taken before this existed, with default switches, stay the same."""
    out = dict(settings)
    for key, default in SPEED_SWITCHES.items():
        owner, name = key.split(".", 1)
        if owner == section and name in out:
            out[name] = default
    return out
