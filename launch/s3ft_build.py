"""S3FT target building alone: `python launch/s3ft_build.py data=gsm [overrides]` (or via deepspeed).

Writes OUTPUT_DIR/s3ft/targets.jsonl (or method.targets_file): for every id the
chat messages with the chosen target, its source (own | paraphrase | gold) and
the raw generations; mix.json beside it holds the share of each source.
"""
from sftmix_ds.cli import s3ft_build_main

if __name__ == "__main__":
    s3ft_build_main()
