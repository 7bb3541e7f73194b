from setuptools import find_packages, setup

setup(
    name="sftmix_ds",
    version="0.1.0",
    description="Distributed instruction tuning on DeepSpeed ZeRO-3: plain SFT, SFTMix and S3FT",
    packages=find_packages(include=["sftmix_ds", "sftmix_ds.*"]),
    package_data={"sftmix_ds": ["builtin_data/*.jsonl", "builtin_data/smollm2_tokenizer/*", "chat_templates/*.jinja",
                               "eval/lm_eval_tasks/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "datasets",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "wandb",
        "safetensors",
        "tqdm",
        "matplotlib",
        "pyarrow",
        "filelock",
        "peft",
    ],
    entry_points={"console_scripts": [
        "sftmix-train = sftmix_ds.cli:train_main",
        "sftmix-score = sftmix_ds.cli:score_main",
        "sftmix-s3ft-build = sftmix_ds.cli:s3ft_build_main",
        "sftmix-eval = sftmix_ds.cli:eval_main",
    ]},
    extras_require={"smollm2": ["gguf", "accelerate"], "data": ["reasoning-gym"], "test": ["pytest"],
                    "lm_eval": ["lm_eval==0.4.13"]},
)
