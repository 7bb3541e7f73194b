import json
import os

import pytest
import torch

from sftmix_ds.data import DataError, encode, load_conversations, load_examples
from sftmix_ds.data.batching import Batches, collate, pack, response_tokens

IGNORE = -100


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def assistant_text(tokenizer, ids, labels):
    return tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE])


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    ids, labels = encode(tokenizer, messages, "x")
    assert len(ids) == len(labels)
    # Both assistant turns, each with its end-of-turn marker, and nothing else (not the newline that
    # separates turns after <|im_end|>: generation stops at the marker).
    assert assistant_text(tokenizer, ids, labels) == "hello there<|im_end|>4<|im_end|>"
    # Labels equal the ids where they are set (the shift happens in the loss).
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    # The whole text decodes back to the template's rendering.
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_three_formats_give_the_same_conversation(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 and 2", "output": "3"}])
    pc = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Add\n\n1 and 2", "completion": "3"}])
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Add\n\n1 and 2"},
                                                           {"role": "assistant", "content": "3"}]}])
    convs = [load_conversations([p])[0] for p in (alpaca, pc, chat)]
    assert convs[0].messages == convs[1].messages == convs[2].messages
    assert convs[0].id == convs[1].id == convs[2].id  # derived from content


def test_ids_stable_and_unique(tmp_path):
    recs = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": "a"}, {"id": 7, "prompt": "x",
                                                                                       "completion": "y"}]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    ids = [c.id for c in load_conversations([path])]
    assert ids == [c.id for c in load_conversations([path])]
    assert len(set(ids)) == 3 and ids[1] == ids[0] + "-2" and ids[2] == "7"


def test_parquet_json_and_saved_dataset(tmp_path):
    import datasets

    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    ds = datasets.Dataset.from_list(records)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.json").write_text(json.dumps(records))
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    expected = [c.messages for c in load_conversations([jsonl])]
    for p in ("d.parquet", "saved", "d.json"):
        assert [c.messages for c in load_conversations([str(tmp_path / p)])] == expected


BAD = [
    ('{"instruction": "q", "output": "a"}\n{"instruction": "q2", "output": ', ":2: invalid JSON"),
    ('{"instruction": "q"}', ":1: missing field 'output'"),
    ('{"instruction": "q", "output": "   "}', ":1: field 'output' is empty"),
    ('{"instruction": "q", "output": 5}', ":1: field 'output' must be a string"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}',
     ":1: messages[1]: unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "q"}]}', ":1: conversation has no assistant turn"),
    ('{"question": "q", "answer": "a"}', ":1: unknown record format"),
    ('{"id": "a", "prompt": "q", "completion": "a"}\n{"id": "a", "prompt": "r", "completion": "b"}',
     ":2: duplicate id 'a'"),
    ('{"instruction": null, "output": "a"}', ":1: missing field 'instruction'"),
    ('{"prompt": "q", "completion": " \\t\\n "}', ":1: field 'completion' is empty"),
    ('42', ":1: expected a JSON object, got int"),
    ('{"messages": "hello"}', ":1: field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}', ":1: messages[0]: missing field"),
    ('{"prompt": "q\\ud800", "completion": "a"}', ":1: field 'prompt' holds a lone surrogate (U+D800 at character 1)"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}, '
     '{"role": "user", "content": "q"}]}', ":1: messages[1]: the conversation starts with an assistant turn"),
]


@pytest.mark.parametrize("content,message", BAD)
def test_bad_input_names_file_line_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as e:
        load_conversations([str(path)])
    assert str(e.value).startswith(str(path)) and message in str(e.value)


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_conversations([str(tmp_path / "nope.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl: no records"):
        load_conversations([str(tmp_path / "empty.jsonl")])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:1: not valid UTF-8"):
        load_conversations([str(tmp_path / "latin1.jsonl")])


def test_bom_is_accepted(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "q", "completion": "a"}\n')
    assert load_conversations([str(tmp_path / "bom.jsonl")])[0].messages[1]["content"] == "a"


def test_overlong_truncate_or_drop_and_cache(tmp_path, tokenizer):
    long = {"id": "long", "prompt": "q", "completion": " ".join(["word"] * 300)}
    short = {"id": "short", "prompt": "q", "completion": "a"}
    path = write_jsonl(tmp_path / "d.jsonl", [long, short])
    kw = dict(fmt="auto", max_length=64, system_prompt=None, cache_dir=str(tmp_path / "cache"))
    truncated = load_examples([path], tokenizer, overlong="truncate", **kw)
    assert [e.id for e in truncated] == ["long", "short"] and len(truncated[0].input_ids) == 64
    dropped = load_examples([path], tokenizer, overlong="drop", **kw)
    assert [e.id for e in dropped] == ["short"]
    assert len(os.listdir(tmp_path / "cache")) == 4  # two cache files + their locks
    again = load_examples([path], tokenizer, overlong="drop", **kw)
    assert [(e.id, e.input_ids, e.labels) for e in again] == [(e.id, e.input_ids, e.labels) for e in dropped]


@pytest.mark.parametrize("n,mb,accum,world", [(10, 2, 1, 2), (13, 2, 2, 2), (8, 4, 1, 1), (5, 1, 3, 2)])
def test_batches_use_every_example_once_per_epoch(n, mb, accum, world):
    seen = []
    for rank in range(world):
        b = Batches(n, mb, accum, world, rank, seed=3)
        for step in range(b.steps_per_epoch):
            micro = b.micro_batches(1, step)
            assert len(micro) == accum and all(len(m) == mb for m in micro)  # same shape on every rank
            seen += [i for m in micro for i in m if i is not None]
    assert sorted(seen) == list(range(n))
    b = Batches(n, mb, accum, world, 0, seed=3)
    assert b.order(0) != b.order(1) or n < 3  # reshuffled per epoch
    assert Batches(n, mb, accum, world, 0, seed=3).order(1) == b.order(1)  # deterministic


def test_collate_pads_and_padding_slots_carry_no_loss(tokenizer):
    from sftmix_ds.data.tokenize import Example

    ex = Example("a", [5, 6, 7], [IGNORE, 6, 7])
    batch = collate([ex, None], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE] * 3]
    assert batch["ids"] == ["a", None]


def test_bad_containers(tmp_path):
    (tmp_path / "obj.json").write_text('{"instruction": "q", "output": "a"}')
    with pytest.raises(DataError, match=r"obj.json: expected a JSON list of records, got dict"):
        load_conversations([str(tmp_path / "obj.json")])
    (tmp_path / "somedir").mkdir()
    with pytest.raises(DataError, match=r"somedir: not a datasets.save_to_disk folder"):
        load_conversations([str(tmp_path / "somedir")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.csv: unknown file type"):
        load_conversations([str(tmp_path / "data.csv")])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), str(tmp_path / "wrong.parquet"))
    with pytest.raises(DataError, match=r"wrong.parquet\[record 0\]: unknown record format.*\['answer', 'question'\]"):
        load_conversations([str(tmp_path / "wrong.parquet")])
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read Parquet"):
        load_conversations([str(tmp_path / "broken.parquet")])


def test_tokenizer_without_chat_template_is_named(tmp_path, tokenizer):
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"d.jsonl:1: the tokenizer has no chat template"):
        load_examples([path], bare, fmt="auto", max_length=64, overlong="truncate", system_prompt=None,
                      cache_dir=str(tmp_path / "cache"))


def test_a_10_mb_field_is_truncated_by_policy(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "big.jsonl", [
        {"id": "big", "prompt": "Summarise.", "completion": "word " * 2_000_000},
        {"id": "small", "prompt": "q", "completion": "a"}])
    assert os.path.getsize(path) > 10_000_000
    examples = load_examples([path], tokenizer, fmt="auto", max_length=128, overlong="truncate", system_prompt=None,
                             cache_dir=str(tmp_path / "cache"))
    assert [len(e.input_ids) for e in examples][0] == 128 and examples[0].n_response > 0


def random_examples(lengths, vocab=100, seed=1):
    from sftmix_ds.data.tokenize import Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append(Example(f"ex{i}", ids, [IGNORE] * (n // 2) + ids[n // 2:]))
    return out


def test_pack_fits_rows_and_keeps_every_token():
    examples = random_examples([5, 9, 3, 12, 7, 4]) + [None]
    batch = pack(examples, pad_id=0, width=16)
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= 16  # 40 tokens in 3 rows of <= 16
    assert int(batch["attention_mask"].sum()) == 40
    assert sorted(batch["input_ids"][batch["attention_mask"].bool()].tolist()) == \
        sorted(t for e in examples if e for t in e.input_ids)
    assert response_tokens(batch["labels"]) == response_tokens(collate(examples, 0)["labels"])
    starts = (batch["position_ids"] == 0).sum().item()  # one start per example, plus padded tails
    assert starts == 6 + int((batch["attention_mask"] == 0).any(1).sum())
    assert pack([None, None], 0, 16)["labels"].eq(IGNORE).all()
    assert pack(random_examples([20]), 0, 16)["input_ids"].shape == (1, 20)  # longer than width: a row of its own


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_padded(attn):
    """Packed rows (position ids restarting, attention_mask=None) give each example the hidden
    states it has alone, so the NTP loss and its gradients equal the padded batch's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftmix_ds.losses import Head
    from sftmix_ds.methods.base import RunOptions
    from sftmix_ds.methods.ntp import NTP

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn))
    examples = random_examples([5, 9, 3, 12, 7, 4]) + [None]
    results = []
    for method in (NTP(), NTP(options=RunOptions(pack_width=16))):
        batch = method.collate(examples, pad_id=0)
        assert ("position_ids" in batch) == bool(method.options.pack_width)
        mask = None if "position_ids" in batch else batch["attention_mask"]
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=mask,
                                     position_ids=batch.get("position_ids"), use_cache=False).last_hidden_state
        model.zero_grad()
        loss = method.loss_terms(hidden, Head(model.get_output_embeddings().weight), batch)["ntp"]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (padded, g_padded), (packed, g_packed) = results
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_group_by_length_makes_homogeneous_steps_and_keeps_the_plan():
    lengths = torch.randint(5, 500, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    plain = Batches(300, 2, 1, 2, 0, seed=3)
    grouped = Batches(300, 2, 1, 2, 0, seed=3, lengths=lengths)
    assert grouped.steps_per_epoch == plain.steps_per_epoch == 75
    for epoch in (0, 1):
        order = grouped.order(epoch)
        assert sorted(order) == list(range(300))
        spread = lambda o: sum(max(lengths[i] for i in o[s:s + 4]) - min(lengths[i] for i in o[s:s + 4])
                               for s in range(0, 300, 4))
        assert spread(order) < spread(plain.order(epoch)) / 5  # much less padding within a step
    assert Batches(300, 2, 1, 2, 0, seed=3, lengths=lengths).order(1) == grouped.order(1)  # exact on resume
    assert grouped.order(0) != grouped.order(1)
    short = Batches(10, 2, 1, 2, 1, seed=3, lengths=list(range(10)))  # 10 = 2 full steps of 4 + 2 left over
    assert [len([i for i in short.global_step_indices(0, s) if i is not None]) for s in range(3)] == [4, 4, 2]


def test_unreadable_paths_are_named_not_raised(tmp_path, tokenizer):
    loop = tmp_path / "loop.jsonl"
    os.symlink(loop, loop)  # a symlink loop
    kw = dict(fmt="auto", max_length=64, overlong="truncate", system_prompt=None, cache_dir=str(tmp_path / "cache"))
    for path, message in ((loop, "loop.jsonl: cannot read"), (tmp_path / "gone.jsonl", "gone.jsonl: cannot read")):
        with pytest.raises(DataError, match=message):
            load_examples([str(path)], tokenizer, **kw)


def test_cache_follows_content_not_size_and_mtime(tmp_path, tokenizer):
    """cp -p / rsync -t keep size and mtime; the cache must notice the new content anyway."""
    path = tmp_path / "d.jsonl"
    kw = dict(fmt="auto", max_length=64, overlong="truncate", system_prompt=None, cache_dir=str(tmp_path / "cache"))
    path.write_text('{"id": "x", "prompt": "2+2?", "completion": "4"}\n')
    stamp = os.stat(path)
    first = load_examples([str(path)], tokenizer, **kw)
    path.write_text('{"id": "x", "prompt": "2+3?", "completion": "5"}\n')  # same size
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = load_examples([str(path)], tokenizer, **kw)
    assert first[0].input_ids != second[0].input_ids
    assert tokenizer.decode(second[0].input_ids).count("2+3?") == 1


def test_the_cache_follows_the_whole_tokenizer_not_only_its_vocabulary(tmp_path, tokenizer):
    """Two tokenizers with one vocabulary that split text differently (here a lowercasing
    normalizer) never share cached ids; the same tokenizer from another folder does."""
    import copy

    from tokenizers import normalizers

    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "x", "prompt": "Say HELLO", "completion": "HELLO World"}])
    kw = dict(fmt="auto", max_length=64, overlong="truncate", system_prompt=None, cache_dir=str(tmp_path / "cache"))
    first = load_examples([path], tokenizer, **kw)
    lowercasing = copy.deepcopy(tokenizer)
    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert lowercasing.get_vocab() == tokenizer.get_vocab()
    second = load_examples([path], lowercasing, **kw)
    assert second[0].input_ids != first[0].input_ids
    assert second[0].input_ids == lowercasing.apply_chat_template(
        [{"role": "user", "content": "Say HELLO"}, {"role": "assistant", "content": "HELLO World"}], tokenize=True,
        return_dict=False)[:len(second[0].input_ids)]
    assert len(os.listdir(tmp_path / "cache")) == 4  # a cache file each, and their locks
    assert load_examples([path], copy.deepcopy(tokenizer), **kw)[0].input_ids == first[0].input_ids
    assert len(os.listdir(tmp_path / "cache")) == 4


def test_a_huge_field_is_cut_before_tokenizing_with_the_same_result(tmp_path, tokenizer):
    """The cut (max_length x the longest token's characters) cannot change the first max_length
    tokens: the capped tokenization equals the full one, truncated."""
    from sftmix_ds.data.tokenize import encode, longest_token_chars, tokenize_conversations

    words = " ".join(f"w{i % 97}x{i % 13}" for i in range(60_000))  # about 400 KB: the full tokenization is affordable
    conv = load_conversations([write_jsonl(tmp_path / "d.jsonl", [{"id": "big", "prompt": "Repeat the words.",
                                                                   "completion": words}])])
    (example,), stats = tokenize_conversations(conv, tokenizer, max_length=128, overlong="truncate")
    full_ids, full_labels = encode(tokenizer, conv[0].messages, conv[0].where)
    assert len(words) > 128 * longest_token_chars(tokenizer) + 1024  # the cut happened
    assert example.input_ids == full_ids[:128] and example.labels == full_labels[:128]
    assert stats["truncated"] == 1
    dropped, stats = tokenize_conversations(conv, tokenizer, max_length=128, overlong="drop")
    assert dropped == [] and stats["dropped_overlong"] == 1


def cpu_flash_kernels():
    """flash-attn's two kernels as transformers calls them, in plain torch on CPU: causal attention
    over each row ([B, T, H, D]), and over each segment of cu_seqlens (varlen, [N, H, D])."""
    import torch.nn.functional as F

    def attend(q, k, v, scale):  # causal, [T, H, D]; k and v may have fewer heads (GQA)
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)

    def flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, **_):
        return torch.stack([attend(q[b], k[b], v[b], softmax_scale) for b in range(q.shape[0])])

    def flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0,
                     softmax_scale=None, causal=True, **_):
        bounds = cu_seqlens_q.tolist()
        return torch.cat([attend(q[s:e], k[s:e], v[s:e], softmax_scale) for s, e in zip(bounds, bounds[1:])])

    return flash, flash_varlen


def test_packed_rows_reach_flash_attention_as_one_row(monkeypatch):
    """transformers' flash-attention path (its real code, the kernels emulated on CPU) separates
    packed examples only in a one-row batch: LossModule runs several packed rows as one, so the loss
    and gradients equal the padded batch's; the rows passed as they are would mix examples."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers import modeling_flash_attention_utils as fa_utils

    from sftmix_ds.engine.wrapper import LossModule
    from sftmix_ds.methods.base import RunOptions
    from sftmix_ds.methods.ntp import NTP

    from .test_heads import NoZeRO

    flash, flash_varlen = cpu_flash_kernels()
    kernels = ((flash, flash_varlen, None, None, None), (fa_utils._lazy_define_process_function(flash_varlen), dict))
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda *a, **k: kernels)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa"))
    examples = random_examples([5, 9, 3, 12, 7, 4]) + [None]
    results = {}
    packed_ntp = NTP(options=RunOptions(pack_width=16))
    for name, method, attn in (("padded", NTP(), "sdpa"), ("packed", packed_ntp, "flash_attention_2")):
        model.config._attn_implementation = attn
        module = LossModule(model, method.loss_terms, NoZeRO())
        batch = method.collate(examples, pad_id=0)
        model.zero_grad()
        loss = module(**batch)["ntp"]
        loss.backward()
        results[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    packed_batch = NTP(options=RunOptions(pack_width=16)).collate(examples, pad_id=0)
    assert packed_batch["input_ids"].shape[0] == 3  # several packed rows: the case flash kernels get wrong
    (padded, g_padded), (packed, g_packed) = results["padded"], results["packed"]
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_packed, g_padded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    hidden = model.get_decoder()(input_ids=packed_batch["input_ids"], position_ids=packed_batch["position_ids"],
                                 use_cache=False).last_hidden_state  # the rows as they are: examples attend across
    mixed = NTP(options=RunOptions(pack_width=16)).loss_terms(hidden, module.head(), packed_batch)["ntp"]
    assert abs(mixed.item() - padded.item()) > 1e-3


def test_held_out_files_have_their_own_format(tmp_path, tokenizer):
    from omegaconf import OmegaConf

    from sftmix_ds.config import DataConfig
    from sftmix_ds.data import load_split

    chat = write_jsonl(tmp_path / "held_out.jsonl", [{"messages": [{"role": "user", "content": "1+1?"},
                                                                   {"role": "assistant", "content": "2"}]}])
    data = OmegaConf.merge(OmegaConf.structured(DataConfig),
                           {"name": "x", "train_files": ["t.jsonl"], "format": "alpaca", "cache_dir": str(tmp_path)})
    with pytest.raises(DataError, match="held_out.jsonl:1"):  # the training format forced on it
        load_split(data, tokenizer, [chat])
    [example] = load_split(data, tokenizer, [chat], held_out=True)  # data.eval_format=auto
    assert assistant_text(tokenizer, example.input_ids, example.labels) == "2<|im_end|>"


def test_fields_that_change_the_conversation_are_converted_or_refused(tmp_path):
    """A top-level system and alpaca history become turns; the older `functions`, malformed tools and
    tool calls, and other message keys are refused naming FILE:LINE and the field, never dropped."""
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"system": "Be terse.", "instruction": "And 3+3?", "output": "6", "history": [["2+2?", "4"]]},
        {"system": "Be terse.", "prompt": "1+1?", "completion": "2"},
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a", "reasoning_content": "think", "tool_calls": None}]}])
    convs = load_conversations([path])
    assert convs[0].messages == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                                 {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                                 {"role": "assistant", "content": "6"}]
    assert convs[1].messages[0] == {"role": "system", "content": "Be terse."}
    assert convs[2].messages[1] == {"role": "assistant", "content": "a", "reasoning_content": "think"}
    bad = {"functions": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          "functions": [{"name": "f"}]}, r"field 'functions' \(function definitions"),
           "tools": ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                      "tools": {"name": "f"}}, r"field 'tools' must be a list of tool definitions"),
           "tool_calls": ({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]}]},
                          r"messages\[1\]: tool_calls\[0\]: expected"),
           "weight": ({"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a", "weight": 0}]},
                      r"messages\[1\]: field 'weight' is not supported"),
           "two systems": ({"system": "s", "messages": [{"role": "system", "content": "t"},
                                                        {"role": "user", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]},
                           "both a top-level 'system' field and a system message"),
           "history": ({"instruction": "q", "output": "a", "history": [["only one"]]},
                       r"history\[0\] must be an \[instruction, response\] pair")}
    for name, (record, message) in bad.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": "x", "completion": "y"}, record])
        with pytest.raises(DataError, match=f"{name}.jsonl:2: .*{message}"):
            load_conversations([path])


def test_a_file_rewritten_while_read_is_not_cached_under_its_old_content(tmp_path, tokenizer, monkeypatch):
    import sftmix_ds.data.tokenize as tokenize

    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1?", "completion": "2"}])
    read = tokenize.load_conversations

    def read_then_rewrite(*args, **kwargs):
        conversations = read(*args, **kwargs)
        write_jsonl(path, [{"prompt": "1+1?", "completion": "3"}])  # a writer replaces the file meanwhile
        return conversations

    monkeypatch.setattr(tokenize, "load_conversations", read_then_rewrite)
    settings = dict(fmt="auto", max_length=64, overlong="truncate", system_prompt=None, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="d.jsonl: changed while being read; nothing was cached"):
        load_examples([path], tokenizer, **settings)
    assert [f for f in os.listdir(tmp_path / "c") if not f.endswith(".lock")] == []  # no store, no leftover
    monkeypatch.setattr(tokenize, "load_conversations", read)
    [example] = load_examples([path], tokenizer, **settings)
    assert assistant_text(tokenizer, example.input_ids, example.labels) == "3<|im_end|>"


def test_a_line_without_end_is_refused_without_reading_it_whole(tmp_path, monkeypatch):
    import sftmix_ds.data.formats as formats

    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 1 << 20)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n" + "a" * (3 << 20))
    with pytest.raises(DataError, match="d.jsonl:2: a line longer than 1 MiB"):
        load_conversations([str(path)])


def test_parallel_tokenization_gives_the_same_examples_and_names_bad_lines(tmp_path, tokenizer, monkeypatch):
    import sftmix_ds.data.tokenize as tokenize

    monkeypatch.setattr(tokenize, "PARALLEL_MIN", 1)  # workers even for a small set
    records = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                             {"role": "assistant", "content": f"{2 * i}" + " and more" * (i % 7)}]}
               for i in range(300)]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    convs = load_conversations([path])
    one = tokenize.tokenize_conversations(convs, tokenizer, 24, "drop", num_proc=1)
    three = tokenize.tokenize_conversations(convs, tokenizer, 24, "drop", num_proc=3)
    assert one == three and one[1]["dropped_overlong"] > 0  # ids, labels, order and counts
    records[250]["messages"][1]["content"] = "REJECT"
    convs = load_conversations([write_jsonl(tmp_path / "e.jsonl", records)])
    with pytest.raises(DataError, match="e.jsonl:251: the chat template rejects this conversation"):
        tokenize.tokenize_conversations(convs, tokenizer_rejecting("REJECT"), 64, "drop", num_proc=2)


def tokenizer_rejecting(marker):
    """SmolLM2's tokenizer with a template that raises on a message containing `marker`."""
    import transformers

    from sftmix_ds.models import SMOLLM2_TOKENIZER

    tok = transformers.AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    tok.chat_template = ("{%- for m in messages %}{%- if '" + marker + "' in m.content %}"
                         "{{- raise_exception('bad message') }}{%- endif %}"
                         "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    return tok
