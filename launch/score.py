"""SFTMix stage 1 alone: `python launch/score.py [overrides]` or `deepspeed launch/score.py ...`.

Writes OUTPUT_DIR/confidence/<fingerprint>/confidence.jsonl (one record per
example id: per-checkpoint perplexities, confidence, split), a histogram PNG
and summary.json. method.score_checkpoints=[a,b] scores given model folders
instead of training a reference run.
"""
from sftmix_ds.cli import score_main

if __name__ == "__main__":
    score_main()
