"""Evaluate an exported model or the base model:
`python launch/eval.py eval=arith eval.model_path=outputs/sftmix-smollm2_135m-arith/model`
(or via deepspeed for several ranks). Writes eval.json and eval.md to OUTPUT_DIR/eval/base (the base
model) or OUTPUT_DIR/eval/<tag of eval.model_path>.
"""
from sftmix_ds.cli import eval_main

if __name__ == "__main__":
    eval_main()
