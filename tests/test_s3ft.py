"""S3FT: the sandbox, the leak filter, and the target build end to end (the judges: tests/test_judges.py)."""
import json
import os

import pytest

from sftmix_ds.inference import resolve_judge, run_python
from sftmix_ds.inference.judges import numeric
from sftmix_ds.s3ft import leaks_prompt, read_done

from .helpers import ROOT, launch_cli, train_cli

HOSTILE = {
    "infinite loop": "while True:\n    pass",
    "memory hog": "x = bytearray(8 << 30)",
    "fork bomb": "import os\nwhile True:\n    os.fork()",
    "writes outside its directory": "open({target!r}, 'w').write('pwned')",
    "opens a socket": "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "raw socket module": "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', 9))",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_sandbox_contains_hostile_code(name, tmp_path):
    target = str(tmp_path / "outside.txt")
    result = run_python(HOSTILE[name].format(target=target), timeout_s=3, memory_mb=512)
    assert not result.passed
    assert not os.path.exists(target)
    assert run_python("assert sum(range(4)) == 6").passed  # the next check runs normally


def test_sandbox_environment_is_empty(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "x")
    program = "import os\nassert 'SECRET_TOKEN' not in os.environ\nassert os.getcwd().startswith('/tmp')"
    assert run_python(program).passed

















def test_leak_filter_and_judge_resolution():
    assert leaks_prompt("Here is the reference answer rewritten: 5")
    assert leaks_prompt("Your response was correct, the answer is 5")
    assert not leaks_prompt("First add 2 and 3, which gives 5. The answer is 5.")
    assert resolve_judge("sftmix_ds.inference.judges.numeric") is numeric
    with pytest.raises(ValueError, match="unknown judge"):
        resolve_judge("fuzzy")


def _data(tmp_path, n):
    path = tmp_path / "d.jsonl"
    with open(os.path.join(ROOT, "sftmix_ds", "builtin_data", "arith_train.jsonl")) as f:
        lines = f.readlines()
    path.write_text("".join(lines[:n // 2] + lines[64:64 + n - n // 2]))  # arithmetic and leg counting
    return str(path)


@pytest.mark.e2e
def test_build_with_smollm2_routes_every_example_correctly(tmp_path):
    out = tmp_path / "run"
    launch_cli("s3ft_build.py", ["data=jsonl", "data.judge=numeric", f"data.train_files=[{_data(tmp_path, 6)}]",
                                 "method.max_new_tokens=32", f"output_dir={out}"])
    records = read_done(str(out / "s3ft" / "targets.jsonl"))
    assert len(records) == 6
    for r in records.values():
        target = r["messages"][-1]["content"]
        assert r["messages"][-1]["role"] == "assistant" and r["source"] in ("own", "paraphrase", "gold")
        judged = numeric({"answer": r["answer"]}, r["own"])
        assert r["own_correct"] == judged
        if r["source"] == "own":
            assert target == r["own"]
        elif r["source"] == "paraphrase":
            assert target == r["paraphrase"] and not leaks_prompt(target)
            assert numeric({"answer": r["answer"]}, target) and not r["own_correct"]
        else:
            assert target == r["gold"] and not r["own_correct"] and not r["paraphrase_correct"]
    with open(out / "s3ft" / "mix.json") as f:
        mix = json.load(f)
    assert sum(mix["counts"].values()) == 6


@pytest.mark.e2e
def test_build_on_two_ranks_once_each_and_resume_after_a_crash(tmp_path):
    out = tmp_path / "run"
    args = ["model=tiny", "data=jsonl", "data.judge=numeric", f"data.train_files=[{_data(tmp_path, 7)}]",
            "method.max_new_tokens=4", "method.write_every=3", "method.generate_batch_size=1", f"output_dir={out}"]
    launch_cli("s3ft_build.py", args, nproc=2)
    path = out / "s3ft" / "targets.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 7 and len({json.loads(line)["id"] for line in lines}) == 7
    # Greedy generation one prompt at a time gives the same text however prompts are dealt to ranks.
    single = tmp_path / "single"
    launch_cli("s3ft_build.py", args[:-1] + [f"output_dir={single}"])
    one = read_done(str(single / "s3ft" / "targets.jsonl"))
    two = {json.loads(line)["id"]: json.loads(line) for line in lines}
    assert {i: (r["own"], r["paraphrase"]) for i, r in one.items()} == {i: (r["own"], r["paraphrase"])
                                                                       for i, r in two.items()}
    # A crash mid-write: two records and a torn third line remain.
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])
    proc = launch_cli("s3ft_build.py", args)
    assert "2 already built, 5 pending" in proc.stderr
    assert sorted(read_done(str(path))) == sorted(json.loads(line)["id"] for line in lines)


@pytest.mark.e2e
# lora: the paper's own setting (rank 8, alpha 16, dropout 0.1); long_context: with the one-device switches
@pytest.mark.parametrize("peft", ["none", "lora", "lora_long_context"])
def test_method_s3ft_trains_on_the_built_targets(peft, tmp_path):
    out = tmp_path / "run"
    long_context = ["train.gradient_checkpointing=true", "train.mlp_tiles=3", "train.offload_activations=true"]
    proc = train_cli(["model=tiny", "method=s3ft", "data=jsonl", "data.judge=numeric",
                      f"data.train_files=[{_data(tmp_path, 8)}]", "method.max_new_tokens=4", "train.micro_batch_size=4",
                      "logger=wandb", f"peft={peft.split('_')[0]}", f"output_dir={out}",
                      *(long_context if peft.endswith("long_context") else [])])
    assert ("saved activations moved to host memory" in proc.stderr) == peft.endswith("long_context")
    assert (out / "adapter" / "adapter_model.safetensors").exists() == (peft != "none")
    assert list((out / "s3ft" / "wandb").glob("offline-run-*"))  # the target mix, as its own wandb run
    assert len(read_done(str(out / "s3ft" / "targets.jsonl"))) == 8
    with open(out / "metrics.jsonl") as f:
        assert len(f.readlines()) == 2  # 8 targets / global batch 4
    assert (out / "model" / "model.safetensors").exists()


def test_target_selection_on_a_scripted_model():
    from omegaconf import OmegaConf

    from sftmix_ds.methods.s3ft import S3FTConfig
    from sftmix_ds.data.formats import Conversation
    from sftmix_ds.s3ft.build import build_chunk, make_judge

    # question -> (own answer, paraphrase); gold answers are all 7
    script = {"own right": ("The answer is 7.", None),
              "paraphrase right": ("The answer is 8.", "Adding up gives 7. The answer is 7."),
              "both wrong": ("The answer is 8.", "The answer is 9."),
              "paraphrase leaks": ("no idea", "The reference answer says 7, so the answer is 7.")}

    def scripted(prompts, desc=""):
        out = []
        for messages in prompts:
            text = messages[-1]["content"]
            question = next(q for q in script if q in text)
            out.append(script[question][0] if text == question else script[question][1])
        return out

    convs = [Conversation(q, [{"role": "user", "content": q}, {"role": "assistant", "content": "It is 7."}], "t",
                          {"answer": "7"}) for q in script]
    m = OmegaConf.structured(S3FTConfig)
    d = OmegaConf.create({"answer_field": "answer"})
    same_rank = lambda items, fn: fn(items)
    records = build_chunk(convs, m, d, scripted, make_judge("numeric", scripted, m.judge_prompt, same_rank),
                          same_rank)
    got = {r["id"]: (r["source"], r["messages"][-1]["content"]) for r in records}
    assert got == {"own right": ("own", "The answer is 7."),
                   "paraphrase right": ("paraphrase", "Adding up gives 7. The answer is 7."),
                   "both wrong": ("gold", "It is 7."), "paraphrase leaks": ("gold", "It is 7.")}
    leaked = next(r for r in records if r["id"] == "paraphrase leaks")
    assert leaked["paraphrase_leaked"] and not leaked["paraphrase_correct"]


@pytest.mark.e2e
def test_targets_for_other_data_and_conversations_without_a_final_answer_are_refused(tmp_path):
    from sftmix_ds.data import DataError, load_conversations, require_final_answer
    from sftmix_ds.s3ft import check_targets_match

    data = _data(tmp_path, 6)
    targets = tmp_path / "targets.jsonl"
    targets.write_text(json.dumps({"id": "someone-else", "source": "own", "messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(DataError, match=r"targets.jsonl: the S3FT targets do not match the training data: 6 of its "
                                        r"6 ids missing .* 1 ids not in the data \(e.g. \['someone-else'\]\)"):
        check_targets_match(str(targets), load_conversations([data]))
    proc = train_cli(["model=tiny", "method=s3ft", "data=jsonl", "data.judge=numeric", f"data.train_files=[{data}]",
                      f"method.targets_file={targets}", f"output_dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2 and "the S3FT targets do not match the training data" in proc.stderr
    trailing = tmp_path / "trailing.jsonl"
    trailing.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"},
                                                 {"role": "user", "content": "thanks"}]}) + "\n")
    with pytest.raises(DataError, match=r"trailing.jsonl:1: the conversation ends with a user turn; S3FT"):
        require_final_answer(load_conversations([str(trailing)]), "S3FT")
