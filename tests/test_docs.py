"""The README and docs/ stay true to the code: every config key they name exists, every results file and
repository file they point to is there, and the README stays a short entrance."""
import glob
import os
import re

import pytest
from omegaconf import DictConfig, OmegaConf

from sftmix_ds.config import CONF_DIR, EvalConfig, register_configs

from .helpers import ROOT

PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SECTIONS = ("model", "data", "method", "train", "deepspeed", "peft", "logger", "eval")
# A key in backticks, optionally with a leading + and a value: `train.lr`, `+data.eval_sets.NAME=[...]`.
KEY = re.compile(r"`\+?((?:" + "|".join(SECTIONS) + r")\.[A-Za-z_][A-Za-z0-9_.]*)")
FILES = (".json", ".md", ".log", ".jsonl", ".yaml", ".png", ".py")  # `eval.json` is a file, not a key
# Free-form mappings: any key below them is the user's.
OPEN = ("data.eval_sets", "data.columns", "deepspeed.extra", "model.arch", "eval.harness.gen_kwargs")


def page_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def schema():
    """Every key a config can hold: the default training config, every method's schema, the eval schema."""
    from hydra import compose, initialize_config_dir

    from sftmix_ds.methods.ntp import NTPConfig
    from sftmix_ds.methods.s3ft import S3FTConfig
    from sftmix_ds.methods.sftmix import SFTMixConfig

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = OmegaConf.to_container(compose(config_name="train"), resolve=False)
    methods = {}
    for c in (NTPConfig, SFTMixConfig, S3FTConfig):
        methods.update(OmegaConf.to_container(OmegaConf.structured(c)))
    cfg["method"] = methods
    cfg["eval"] = OmegaConf.to_container(OmegaConf.structured(EvalConfig))
    return cfg


def exists(tree: dict, key: str) -> bool:
    if key.startswith(OPEN):
        return True
    node = tree
    for part in key.split("."):
        if part.isdigit() and isinstance(node, list):  # eval.tasks.0.limit: an entry of a list of tasks
            node = {}
            continue
        if isinstance(node, list) and node == []:
            return True
        if not isinstance(node, (dict, DictConfig)) or part not in node:
            return False
        node = node[part]
    return True


def test_every_config_key_the_docs_name_exists():
    tree = schema()
    tree["eval"]["tasks"] = [{"name": "", "files": [], "judge": "", "format": "", "answer_field": "", "limit": 0}]
    tree["eval"]["general"] = tree["eval"]["tasks"]
    named = {(page, key.rstrip(".")) for page in PAGES for key in KEY.findall(page_text(page))}
    missing = sorted(f"{os.path.relpath(page, ROOT)}: {key}" for page, key in named
                     if not key.endswith(FILES) and not exists(tree, key))
    assert not missing, "\n".join(missing)


def test_every_file_the_docs_point_to_is_there():
    pattern = re.compile(r"((?:benchmarks/results|docs|conf|launch|sftmix_ds|tests)/[A-Za-z0-9_./-]+"
                         r"\.(?:md|png|json|py|yaml|sbatch|jsonl|jinja))")
    missing = sorted({f"{os.path.relpath(page, ROOT)}: {path}" for page in PAGES for path in pattern.findall(
        page_text(page)) if "NAME" not in path and not os.path.exists(os.path.join(ROOT, path))})
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("page", PAGES, ids=os.path.basename)
def test_links_between_pages_resolve(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page_text(page)):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(os.path.dirname(page), target)), target


def test_the_readme_is_a_short_entrance():
    text = page_text(PAGES[0])
    assert len(text.splitlines()) <= 200 and "../shared" not in text
    for page in PAGES[1:]:  # every docs page is linked from it
        assert f"(docs/{os.path.basename(page)})" in text, page
