import os

import pytest
import torch

from .helpers import write_random_confidence_file

if not torch.cuda.is_available():  # the Triton loss kernels are tested in triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: launches processes (the entry points, deepspeed, Slurm, benchmarks); "
                                       "`make test-fast` leaves these out")


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct folder (converted once per machine, cached)."""
    from omegaconf import OmegaConf

    from sftmix_ds.models import prepare_model

    cache = os.path.join(os.environ.get("SFTMIX_CACHE", os.path.expanduser("~/.cache/sftmix_ds")), "models")
    return prepare_model(OmegaConf.create({"name": "smollm2_135m", "source": "smollm2"}), cache)


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def confidence_file(tmp_path_factory):
    """A random confidence split of the embedded training set, for SFTMix runs that skip stage 1."""
    return write_random_confidence_file(str(tmp_path_factory.mktemp("conf") / "confidence.jsonl"))
