"""What identifies a run's math, in one place for resume and for every stage fingerprint: the
settings that do not change it, and the digest of the training examples."""
from __future__ import annotations

import hashlib

# Speed switches: tested to leave losses and weights unchanged (the layout test in
# tests/test_train_e2e.py, tests/test_speed.py), so a resumed run may change them and a stage
# fingerprint ignores them.
SPEED_SWITCHES = ("train.gradient_checkpointing", "train.compile", "train.loss_backend", "train.loss_chunk_size",
                  "train.pad_to_multiple_of", "train.padding_mask", "model.attn_implementation",
                  "deepspeed.gather_per_block", "train.mlp_tiles", "train.offload_activations",
                  "method.score_batch_size", "method.score_batch_tokens")


def examples_hash(examples) -> "hashlib._Hash":
    """A sha256 fed with the digest of the examples' ids, token ids and labels, in order (a token
    store's is recorded when it is built; more may be fed after)."""
    from .data.store import examples_digest

    return hashlib.sha256(examples_digest(examples).encode())


# Settings a resumed run may change, and that no stage fingerprint covers: where things go, how often it
# logs, saves and evaluates, the layout, and the speed switches (tested to leave the math unchanged).
# The data files are compared by the examples they give, not by their paths. An entry ending in
# "." or "_" covers every key it begins.
RESUMABLE_CHANGES = ("output_dir", "resume", "resume_force", "model_cache_dir", "logger.", "eval", "data.cache_dir",
                     # the layout, as long as the global batch (compared on its own) is kept (a checkpoint
                     # loads under its own ZeRO stage only: fit_layout says so):
                     "train.micro_batch_size", "train.grad_accum", "train.sequence_parallel",
                     "train.allow_new_global_batch", "deepspeed.zero_stage",
                     "data.train_files", "data.eval_files", "data.eval_sets", "method.stage_dir",
                     "method.confidence_source", "method.confidence_file", "method.targets_file",
                     "method.allow_unsandboxed_code",
                     "deepspeed.timeout_minutes", "deepspeed.peer_timeout_s", "deepspeed.build_lock_wait_minutes",
                     "train.log_every",
                     "train.eval_", "train.save_every", "train.save_every_minutes", "train.keep_checkpoints",
                     "train.stop_after_steps",
                     "train.export_", "train.nonfinite", "train.max_nonfinite_steps", *SPEED_SWITCHES)


def resumable_change(key: str) -> bool:
    return any(key == c or key.startswith(c if c.endswith((".", "_")) else c + ".") for c in RESUMABLE_CHANGES)


def kept_settings(settings: dict, prefix: str = "") -> dict:
    """Every setting of a resolved config (a plain dict; `prefix`: the section it is), flattened to dotted
    keys, but RESUMABLE_CHANGES."""
    flat = {}

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(settings, prefix)
    return {k: v for k, v in flat.items() if not resumable_change(k)}
