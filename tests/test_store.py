"""The token store: the same examples as tokenizing in memory, built once, mapped read-only."""
import glob
import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest

from sftmix_ds.data import DataError, TokenStore, examples_digest, load_conversations, load_examples
from sftmix_ds.data.store import StoreWriter, open_store, pack_chunk
from sftmix_ds.data.tokenize import tokenize_conversations

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILTIN = os.path.join(ROOT, "sftmix_ds", "builtin_data")
SETTINGS = dict(fmt="auto", max_length=96, overlong="truncate", system_prompt=None)


def in_memory(paths, tokenizer, max_length=96, overlong="truncate"):
    """The examples a naive loader makes: every conversation tokenized into Python lists, in order."""
    return tokenize_conversations(load_conversations(paths), tokenizer, max_length, overlong)[0]


HOSTILE = [
    {"messages": [{"role": "user", "content": "ünïcödé ✓ 𝔘 \u200b"}, {"role": "assistant", "content": "é" * 300}]},
    {"prompt": "?", "completion": "only an answer"},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                  {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                  {"role": "assistant", "content": "d " * 200}]},  # truncated inside its second answer
    {"id": "x" * 5000, "prompt": "a long id", "completion": "ok"},
    {"prompt": "no answer left after the cut " * 40, "completion": "late"},  # dropped: no response
]


@pytest.mark.parametrize("files", [["arith_train.jsonl"], ["gsm_train.jsonl", "capitals.jsonl"],
                                   ["study:train.jsonl", "study:general.jsonl"], ["hostile"]])
def test_the_store_gives_the_examples_of_in_memory_tokenization(tmp_path, tokenizer, files):
    paths = []
    for name in files:
        if name == "hostile":
            path = tmp_path / "hostile.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in HOSTILE), encoding="utf-8")
            paths.append(str(path))
        elif name.startswith("study:"):
            paths.append(os.path.join(ROOT, "benchmarks", "study_data", name[6:]))
        else:
            paths.append(os.path.join(BUILTIN, name))
    expected = in_memory(paths, tokenizer)
    store = load_examples(paths, tokenizer, cache_dir=str(tmp_path / "cache"), **SETTINGS)
    assert isinstance(store, TokenStore) and len(store) == len(expected) > 0
    assert list(store) == expected  # ids, token ids, labels and order
    assert store.ids == [e.id for e in expected] and store.lengths.tolist() == [len(e.input_ids) for e in expected]
    assert store[-1] == expected[-1] and store[1:3] == expected[1:3]
    assert store.digest == examples_digest(expected)
    again = load_examples(paths, tokenizer, cache_dir=str(tmp_path / "cache"), **SETTINGS)  # a warm start
    assert again.folder == store.folder and list(again) == expected
    if name == "hostile":  # the long answers and the long prompt are cut at 96 tokens; the prompt loses its answer
        assert store.stats == {"truncated": 3, "dropped_overlong": 0, "dropped_no_response": 1} and len(store) == 4


def test_tokens_are_two_bytes_for_a_small_vocabulary_and_the_arrays_are_mapped_read_only(tmp_path, tokenizer):
    store = load_examples([os.path.join(BUILTIN, "arith_train.jsonl")], tokenizer, cache_dir=str(tmp_path), **SETTINGS)
    tokens = store.arrays["tokens"]
    assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and not tokens.flags.writeable
    assert os.path.getsize(os.path.join(store.folder, "tokens.bin")) == 2 * int(store.lengths.sum())
    wide = StoreWriter(str(tmp_path / "wide"), vocab_size=128_256)  # Llama-3's vocabulary needs int32
    wide.add(pack_chunk([("a", [128_000, 5, 6], [-100, 5, 6])]))
    store = wide.publish({})
    assert store.arrays["tokens"].dtype == np.int32 and store[0].input_ids == [128_000, 5, 6]


def test_a_damaged_store_is_built_again(tmp_path, tokenizer):
    path = [os.path.join(BUILTIN, "arith_eval.jsonl")]
    first = load_examples(path, tokenizer, cache_dir=str(tmp_path), **SETTINGS)
    expected, folder = list(first), first.folder
    with open(os.path.join(folder, "tokens.bin"), "r+b") as f:
        f.truncate(10)
    assert open_store(folder) is None
    again = load_examples(path, tokenizer, cache_dir=str(tmp_path), **SETTINGS)
    assert list(again) == expected


def _rewrite(path, array):
    """Overwrite a file in place with an array of its own size and dtype (damage meta.json cannot see)."""
    with open(path, "r+b") as f:
        f.write(np.ascontiguousarray(array).tobytes())


def _forge_digests(folder):
    """meta.json's digests made to match the files again: a store damaged so it passes every digest."""
    from sftmix_ds.common import file_digest

    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    meta["files"] = {name: file_digest(os.path.join(folder, f"{name}.bin")) for name in meta["files"]}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)


def test_a_store_damaged_in_place_or_built_for_another_key_is_never_served(tmp_path, tokenizer):
    """Same sizes, other bytes: token ids overwritten (one past the vocabulary), lengths of 10^9 in the
    index; a store copied under another key's folder. Each is found (by its digest, or by its structure
    when the digests were forged too) and built again."""
    from sftmix_ds.data.store import store_problem

    path = [os.path.join(BUILTIN, "arith_eval.jsonl")]
    load = lambda: load_examples(path, tokenizer, cache_dir=str(tmp_path), **SETTINGS)
    first = load()
    expected, folder = list(first), first.folder
    tokens = np.array(first.arrays["tokens"])
    damaged = tokens.copy()
    damaged[5] = len(tokenizer)  # an id the embedding does not have
    _rewrite(os.path.join(folder, "tokens.bin"), damaged)
    assert store_problem(folder) == "tokens.bin does not match its recorded digest (changed since it was built)"
    _forge_digests(folder)
    assert store_problem(folder) == f"a token id is at or past the vocabulary's {len(tokenizer)}"
    assert list(load()) == expected and store_problem(folder) is None  # built again
    index = np.array(load().index)
    index[1:, 0] += 10**9
    _rewrite(os.path.join(folder, "index.bin"), index)
    _forge_digests(folder)
    assert store_problem(folder) == "its index does not end at the arrays' sizes"
    assert list(load()) == expected
    other = tmp_path / "0123456789abcdef0123"
    shutil.copytree(folder, other)  # an rsync'd cache under another key
    assert store_problem(str(other)).startswith(f"built for the key {os.path.basename(folder)}")


@pytest.mark.e2e
def test_a_damaged_store_is_built_again_through_the_entry_point_with_a_warning(tmp_path):
    from .helpers import read_metrics, train_cli

    args = ["model=tiny", "method=ntp", "train.max_steps=1", f"data.cache_dir={tmp_path / 'cache'}"]
    train_cli(args + [f"output_dir={tmp_path / 'first'}"])
    for tokens in (tmp_path / "cache").glob("*/tokens.bin"):  # the training and the held-out store
        _rewrite(tokens, np.fromfile(tokens, dtype=np.uint16)[::-1].copy())  # other tokens, the same sizes
    proc = train_cli(args + [f"output_dir={tmp_path / 'second'}"])
    assert "the token store there is not whole (tokens.bin does not match its recorded digest" in proc.stderr
    assert "building it again" in proc.stderr
    assert read_metrics(tmp_path / "second")[0]["loss"] == read_metrics(tmp_path / "first")[0]["loss"]


def _build(folder, chunk, ready, go):
    writer = StoreWriter(folder, vocab_size=100)
    writer.add(chunk)
    ready.wait()
    go.wait()
    print(writer.publish({"builder": os.getpid()}).meta["stats"]["builder"])


def test_two_builders_publishing_one_store_leave_one(tmp_path):
    """Builders on two nodes of a shared filesystem, where the lock may not hold: both write, both
    publish at once; one store is left, whole, and no temporary folder."""
    folder = str(tmp_path / "store")
    chunk = pack_chunk([(f"e{i}", list(range(i, i + 7)), [-100] * 3 + list(range(i + 3, i + 7))) for i in range(50)])
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Barrier(2), ctx.Barrier(2)
    procs = [ctx.Process(target=_build, args=(folder, chunk, ready, go)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert os.listdir(tmp_path) == ["store"]
    store = open_store(folder)
    assert store is not None and len(store) == 50 and store[7].input_ids == list(range(7, 14))


def prefill_datasets_cache(cache: str, repo: str, split: str, records: list, tmp) -> None:
    """The datasets cache that `datasets.load_dataset(repo, split=split)` leaves behind online (an Arrow
    file per split and dataset_info.json in ORG___NAME/default/0.0.0/REVISION), built offline by
    datasets' own JSON builder."""
    import shutil

    from datasets.packaged_modules.json.json import Json

    source = os.path.join(tmp, f"{split}.jsonl")
    with open(source, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    builder = Json(cache_dir=os.path.join(tmp, "build"), data_files={split: source}, dataset_name=repo.split("/")[1],
                   hash="0123abcd")
    builder.download_and_prepare()
    final = os.path.join(cache, repo.replace("/", "___"), "default", "0.0.0", "0123abcd")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    shutil.move(builder.cache_dir, final)


HUB_LOAD = """
import json, sys
from sftmix_ds.data import DataError, load_examples
from sftmix_ds.models import load_tokenizer, SMOLLM2_TOKENIZER
tokenizer, _ = load_tokenizer(SMOLLM2_TOKENIZER)
try:
    store = load_examples([sys.argv[1]], tokenizer, fmt="auto", max_length=96, overlong="truncate",
                          system_prompt=None, cache_dir=sys.argv[2], columns={"prompt": "question"})
    print(json.dumps([[e.id, e.input_ids, e.labels] for e in store]))
except DataError as e:
    print("DataError:", e)
"""


def test_a_dataset_by_name_loads_offline_from_the_datasets_cache_and_a_missing_one_says_what_to_do(tmp_path,
                                                                                                    tokenizer):
    """A fresh process with HF_HUB_OFFLINE=1 and a datasets cache filled beforehand loads
    hf:acme/arith by name, through the code a run takes; columns renames the dataset's fields."""
    import subprocess
    import sys

    records = [{"question": f"{i} + {i}?", "completion": str(2 * i)} for i in range(20)]
    cache = str(tmp_path / "hf_datasets")
    prefill_datasets_cache(cache, "acme/arith", "validation", records, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": cache, "HF_HOME": str(tmp_path / "hf")}
    run = lambda spec: subprocess.run([sys.executable, "-c", HUB_LOAD, spec, str(tmp_path / "tok")], cwd=ROOT,
                                      env=env, capture_output=True, text=True, timeout=300).stdout
    loaded = json.loads(run("hf:acme/arith?split=validation"))
    local = tmp_path / "arith.jsonl"
    local.write_text("".join(json.dumps({"prompt": r["question"], "completion": r["completion"]}) + "\n"
                             for r in records))
    expected = in_memory([str(local)], tokenizer)
    assert [[e.input_ids, e.labels] for e in expected] == [x[1:] for x in loaded] and len(loaded) == 20
    missing = run("hf:acme/missing")
    assert missing.startswith("DataError: hf:acme/missing: cannot load dataset 'acme/missing'")
    assert "offline (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)" in missing and cache in missing
    assert run("hf:acme/arith?split=test").startswith("DataError: hf:acme/arith?split=test: cannot load")
    assert "'splits=test' is not an option" in run("hf:acme/arith?splits=test")


def test_sharegpt_and_text_parts_give_the_labels_of_the_same_chat(tmp_path, tokenizer):
    """ShareGPT turns and OpenAI text parts are the chat they spell: same ids, labels on the
    assistant's content and end-of-turn only; images, calls that are not JSON and unknown senders
    are refused by line."""
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]}
    sharegpt = {"tools": "", "conversations": [  # an empty tools column (LLaMA-Factory's) is no tools
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi\nthere"},
        {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    parts = {"messages": [{**m, "content": [{"type": "text", "text": t} for t in m["content"].split("\n")]}
                          for m in chat["messages"]]}
    files = []
    for name, record in (("chat", chat), ("sharegpt", sharegpt), ("parts", parts)):
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text(json.dumps(record) + "\n")
    [expected], [from_sharegpt], [from_parts] = (in_memory([str(f)], tokenizer) for f in files)
    assert from_sharegpt.input_ids == expected.input_ids and from_sharegpt.labels == expected.labels
    assert from_parts.input_ids == expected.input_ids and from_parts.labels == expected.labels
    trained = tokenizer.decode([t for t, label in zip(expected.input_ids, expected.labels) if label != -100])
    assert trained == "Hello<|im_end|>4<|im_end|>"
    from sftmix_ds.data import DataError

    image = [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
             {"role": "assistant", "content": "a"}]
    bad = {"image": ({"messages": image}, "content\\[0\\]: part of type 'image_url'"),
           "call": ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "add(1)"}]},
                    "conversations\\[1\\]: field 'value' is not valid JSON"),
           "who": ({"conversations": [{"from": "narrator", "value": "x"}]}, "unknown 'from' 'narrator'")}
    for name, (record, message) in bad.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n" + json.dumps(record) + "\n")
        with pytest.raises(DataError, match=f"{name}.jsonl:2: .*{message}"):
            load_conversations([str(path)])


def test_a_mixture_takes_each_source_for_its_epochs_seeded(tmp_path, tokenizer):
    from sftmix_ds.data.mixture import Mixture

    a, b = (load_examples([os.path.join(BUILTIN, f)], tokenizer, cache_dir=str(tmp_path), **SETTINGS)
            for f in ("arith_eval.jsonl", "capitals.jsonl"))
    mix = Mixture([a, b], ["a", "b"], [2, 0.25], seed=3)
    assert [c["taken"] for c in mix.counts] == [2 * len(a), round(0.25 * len(b))]
    assert len(mix) == len(mix.ids) == len(set(mix.ids)) == 2 * len(a) + round(0.25 * len(b))
    assert mix.ids[:len(a)] == a.ids and mix.ids[len(a):2 * len(a)] == [f"{i}#2" for i in a.ids]
    drawn = mix.ids[2 * len(a):]
    assert set(drawn) < set(b.ids)
    for k in (0, len(a) + 5, len(mix) - 1):  # an entry is its source's example under the mixture's id
        source = (a if k < 2 * len(a) else b)
        original = source[source.ids.index(mix.ids[k].split("#")[0])]
        assert (mix[k].input_ids, mix[k].labels) == (original.input_ids, original.labels)
        assert mix.lengths[k] == len(original.input_ids)
    same, other = Mixture([a, b], ["a", "b"], [2, 0.25], seed=3), Mixture([a, b], ["a", "b"], [2, 0.25], seed=4)
    assert same.ids == mix.ids and same.digest == mix.digest
    assert other.ids[2 * len(a):] != drawn and other.digest != mix.digest
    assert Mixture([a, b], ["a", "b"], [1, 1], seed=3).ids == a.ids + b.ids


def test_a_mixture_of_overlapping_sources_or_of_too_many_examples_is_refused_before_it_allocates(tmp_path, tokenizer):
    from sftmix_ds.data.mixture import MAX_EXAMPLES, Mixture

    a = load_examples([os.path.join(BUILTIN, "arith_eval.jsonl")], tokenizer, cache_dir=str(tmp_path), **SETTINGS)
    with pytest.raises(DataError, match=r"data.train_files: x.jsonl and x.jsonl share the example id .*: a "
                                        r"mixture's sources must not overlap \(the same file twice\?"):
        Mixture([a, a], ["x.jsonl", "x.jsonl"], [1, 1], seed=0)
    weight = MAX_EXAMPLES // len(a) + 1
    with pytest.raises(DataError, match=rf"data.weights=\[{weight}\]: the mixture would hold [0-9,]+ examples"):
        Mixture([a], ["x.jsonl"], [weight], seed=0)


@pytest.mark.e2e
def test_mixture_weights_and_repeated_files_are_refused_through_the_entry_point(tmp_path):
    from .helpers import train_cli

    data = os.path.join(BUILTIN, "arith_eval.jsonl")
    base = ["model=tiny", "method=ntp", "data=jsonl", "train.max_steps=1", f"output_dir={tmp_path / 'run'}"]
    for weights, message in (("[1e15]", "data.weights=1000000000000000.0: must be in (0, 10000]"),
                             ("[nan]", "data.weights=nan: must be a finite number"),
                             ("[0]", "data.weights=0.0: must be in (0, 10000]"),
                             ("[-1]", "data.weights=-1.0: must be in (0, 10000]")):
        proc = train_cli(base + [f"data.train_files=[{data}]", f"data.weights={weights}"], check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc = train_cli(base + [f"data.train_files=[{data},{data}]", "data.weights=[1,1]"], check=False)
    assert proc.returncode == 2 and f"data.train_files: {data} and {data} share the example id" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")  # refused before anything trained


@pytest.mark.e2e
def test_a_mixed_run_logs_its_counts_and_resumes_bitwise(tmp_path):
    """One process, two sources (a quarter of one, one and a half of the other): the counts land in
    mixture.json, repeated examples train under their own ids, and stop + resume equals the
    uninterrupted run bitwise; other weights are another run's data; SFTMix splits the mixture."""
    import torch
    from safetensors.torch import load_file

    from sftmix_ds.tracking import MEASURED

    from .helpers import read_metrics, train_cli

    files = ",".join(os.path.join(BUILTIN, f) for f in ("arith_eval.jsonl", "capitals.jsonl"))
    args = ["model=tiny", "method=ntp", "data=jsonl", f"data.train_files=[{files}]", "data.weights=[0.25,1.5]",
            "train.max_steps=4", "train.micro_batch_size=4", "train.lr=1e-3", "train.export_dtype=fp32"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    train_cli(args + [f"output_dir={whole}"])
    with open(os.path.join(whole, "mixture.json")) as f:
        assert [(c["examples"], c["taken"]) for c in json.load(f)] == [(32, 8), (32, 48)]
    with open(os.path.join(whole, "samples.jsonl")) as f:
        assert any("#2" in i for line in f for i in json.loads(line)["ids"])
    train_cli(args + ["train.stop_after_steps=2", f"output_dir={parts}"])
    assert "resumed from" in train_cli(args + [f"output_dir={parts}"]).stderr
    strip = lambda records: [{k: v for k, v in r.items() if k not in MEASURED} for r in records]
    assert strip(read_metrics(parts)) == strip(read_metrics(whole))
    w, ref = (load_file(os.path.join(d, "model", "model.safetensors")) for d in (parts, whole))
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    proc = train_cli(args[:4] + ["data.weights=[0.5,1.5]"] + args[5:] + [f"output_dir={whole}"], check=False)
    assert proc.returncode == 2 and "data.weights: [0.25, 1.5] -> [0.5, 1.5]" in proc.stderr
    # SFTMix splits the mixture as trained: every drawn example, repeats under their own ids, once.
    mixed = str(tmp_path / "sftmix")
    train_cli(["model=tiny", "method=sftmix", "method.confidence_source=random", *args[2:5], "train.max_steps=1",
               "train.export_final=false", f"output_dir={mixed}"])
    (split,) = glob.glob(os.path.join(mixed, "confidence", "random-*", "confidence.jsonl"))
    with open(split) as f:
        ids = [json.loads(line)["id"] for line in list(f)[1:]]  # after the header line
    assert len(ids) == len(set(ids)) == 56 and sum(i.endswith("#2") for i in ids) == 16


def test_a_killed_builders_leftovers_are_removed_by_the_next_build(tmp_path, tokenizer):
    import subprocess

    path = [os.path.join(BUILTIN, "arith_eval.jsonl")]
    store = load_examples(path, tokenizer, cache_dir=str(tmp_path), **SETTINGS)
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = f"{store.folder}.tmp-{os.uname().nodename}-{dead.pid}"
    os.makedirs(leftover)
    live = f"{store.folder}.tmp-{os.uname().nodename}-{os.getppid()}"  # a builder still running
    os.makedirs(live)
    shutil.rmtree(store.folder)
    load_examples(path, tokenizer, cache_dir=str(tmp_path), **SETTINGS)
    assert not os.path.exists(leftover) and os.path.exists(live)
