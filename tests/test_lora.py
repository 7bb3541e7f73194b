"""peft=lora: the same training under ZeRO-3 on 2 ranks, ZeRO-2 and one process; only the
adapters change; the exports (adapter folder, merged model) give the trained model's logits."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file


from .helpers import read_metrics, train_cli

pytestmark = pytest.mark.e2e  # every test here launches processes

# adam_eps: see tests/test_sftmix.py (a larger eps keeps Adam's first update proportional to g).
BASE = ["model=tiny", "peft=lora", "peft.dropout=0", "train.max_steps=3", "train.lr=1e-2", "train.adam_eps=1e-4",
        "train.warmup_ratio=0", "train.export_dtype=fp32", "train.eval_every=0"]
LAYOUTS = {"one": (4, 0, 3), "two_zero3": (2, 2, 3), "two_zero2": (2, 2, 2)}  # micro-batch, ranks, ZeRO stage


@pytest.fixture(scope="module")
def runs(tmp_path_factory, confidence_file):
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for method in ("ntp", "sftmix"):
        extra = [f"method.confidence_file={confidence_file}", "method.mu=0.5"] if method == "sftmix" else []
        for name, (mb, nproc, zero) in LAYOUTS.items():
            if method == "sftmix" and zero == 2:
                continue
            out[method, name] = str(root / f"{method}_{name}")
            train_cli(BASE + [f"method={method}", *extra, f"train.micro_batch_size={mb}", f"deepspeed=zero{zero}",
                              f"output_dir={out[method, name]}"], nproc=nproc)
    return out


def _adapter(run_dir):
    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def _base_path():
    from sftmix_ds.config import load_model_config
    from sftmix_ds.models import prepare_model

    cache = os.path.join(os.environ.get("SFTMIX_CACHE", os.path.expanduser("~/.cache/sftmix_ds")), "models")
    return prepare_model(load_model_config("tiny"), cache)


@pytest.mark.parametrize("method", ["ntp", "sftmix"])
def test_lora_same_under_zero3_zero2_and_one_process(runs, method):
    ref_dir = runs[method, "one"]
    ref, ref_a = read_metrics(ref_dir), _adapter(ref_dir)
    assert len(ref) == 3 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in ref_a)
    assert any(float(v.abs().max()) > 0 for k, v in ref_a.items() if "lora_B" in k)  # the adapters trained
    for (m, name), run_dir in runs.items():
        if m != method or name == "one":
            continue
        for r, g in zip(ref, read_metrics(run_dir), strict=True):
            for key in [k for k in r if k.startswith("loss")]:
                assert g[key] == pytest.approx(r[key], rel=1e-5), (name, key)
        a = _adapter(run_dir)
        assert a.keys() == ref_a.keys()
        for k in ref_a:
            torch.testing.assert_close(a[k], ref_a[k], rtol=1e-4, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize("run", [("ntp", "two_zero3"), ("sftmix", "two_zero3"), ("ntp", "two_zero2")])
def test_only_the_adapters_change_and_the_merged_export_is_base_plus_lora(runs, run):
    """merged = base + (alpha / r) B A on each wrapped layer, every other tensor bitwise the base's:
    so the base weights did not move."""
    run_dir = runs[run]
    base = load_file(os.path.join(_base_path(), "model.safetensors"))
    merged = load_file(os.path.join(run_dir, "model", "model.safetensors"))
    adapter = _adapter(run_dir)
    with open(os.path.join(run_dir, "adapter", "adapter_config.json")) as f:
        config = json.load(f)
    scaling = config["lora_alpha"] / config["r"]
    assert merged.keys() == base.keys()
    wrapped = 0
    for k in base:
        a_key = "base_model.model." + k.replace(".weight", ".lora_A.weight")
        if a_key in adapter:
            b = adapter[a_key.replace("lora_A", "lora_B")]
            torch.testing.assert_close(merged[k], base[k] + scaling * (b @ adapter[a_key]), rtol=1e-6, atol=1e-7)
            assert not torch.equal(merged[k], base[k]) or float(b.abs().max()) == 0
            wrapped += 1
        else:
            assert torch.equal(merged[k], base[k]), k
    assert wrapped == 2 * 7  # tiny: 2 blocks x (q, k, v, o, gate, up, down)


def test_merged_export_gives_the_adapted_models_logits(runs):
    """PeftModel.from_pretrained(base, adapter) (the model as it trained) and the merged folder
    give the same logits on a batch."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = runs["sftmix", "two_zero3"]
    ids = torch.randint(0, 1000, (3, 17), generator=torch.Generator().manual_seed(0))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(_base_path(), dtype=torch.float32),
                                        os.path.join(run_dir, "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "model"), dtype=torch.float32).eval()
    with torch.no_grad():
        want, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(_base_path(), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-3  # the adapters matter


@pytest.mark.parametrize("overrides,message", [
    (["peft.r=0"], "peft.r=0"),
    (["peft.target_modules=[q_proj,attention_dense]"], "peft.target_modules: ['attention_dense'] match no linear"),
    (["peft.dropout=1.5"], "peft.dropout=1.5"),
    (["peft.kind=qlora"], "peft.kind"),
    (["train.export_merged=false", "eval=arith"], "train.export_merged=false"),
])
def test_bad_lora_config_fails_before_any_process_group(overrides, message, tmp_path):
    proc = train_cli(["model=tiny", "peft=lora", *overrides, f"output_dir={tmp_path}/o"], check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "init_distributed" not in proc.stderr and not os.path.exists(tmp_path / "o" / "config.yaml")


def test_adapter_only_export_and_a_finished_run(tmp_path):
    out = tmp_path / "o"
    args = ["model=tiny", "peft=lora", "train.max_steps=1", "train.export_merged=false", "train.eval_every=0",
            f"output_dir={out}"]
    train_cli(args)
    assert (out / "adapter" / "adapter_model.safetensors").exists() and not (out / "model").exists()
    proc = train_cli(args)  # resume=auto on a finished run does nothing
    assert "this run is finished" in proc.stderr


def test_lm_eval_reads_the_merged_export_as_the_adapted_model(runs, monkeypatch):
    """lm-eval on a LoRA run's merged export (what eval.harness evaluates) scores text as it scores
    the base model with the adapter (log-likelihoods: greedy answers of a near-random model can
    flip on a near tie), and run_harness answers every document from it, in a process whose
    environment holds a launcher's settings (as rank 0 of a training run's does): accelerate,
    which lm-eval starts for a model given by path, would try to join a process group there."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from omegaconf import OmegaConf
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftmix_ds.eval.harness import run_harness
    from sftmix_ds.models import load_tokenizer

    for key, value in {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    run_dir = runs["ntp", "one"]
    tokenizer, _ = load_tokenizer(os.path.join(run_dir, "model"))
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    merged = HFLM(pretrained=load(os.path.join(run_dir, "model")), tokenizer=tokenizer, batch_size=4)
    adapted = HFLM(pretrained=PeftModel.from_pretrained(load(_base_path()), os.path.join(run_dir, "adapter")).eval(),
                   tokenizer=tokenizer, batch_size=4)
    requests = [Instance("loglikelihood", {}, (context, continuation), 0)
                for context, continuation in (("Calculate 2 + 3.", " The answer is 5."), ("The capital of", " Paris"))]
    want = [ll for ll, _ in adapted.loglikelihood(requests)]
    got = [ll for ll, _ in merged.loglikelihood(requests)]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    harness = OmegaConf.create({"tasks": ["sftmix_arith"], "include_path": [], "batch_size": 4, "limit": 4,
                                "gen_kwargs": {"max_gen_toks": 8}})
    results = run_harness(harness, os.path.join(run_dir, "model"), tokenizer, "cpu", torch.float32, "<|im_end|>")
    assert len(results["sftmix_arith"]["samples"]) == 4
