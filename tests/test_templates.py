"""Label masking under other families' chat formats. Each fixture template renders the family's
documented format (special tokens, turn layout, system and reasoning handling) on SmolLM2's
vocabulary plus the family's special tokens; the supervised tokens must decode to exactly each
assistant turn's answer and its end-of-turn marker, or the conversation is refused by name."""
import json

import pytest
import transformers

from sftmix_ds.config import ConfigError
from sftmix_ds.data import DataError, encode, end_of_turn_token
from sftmix_ds.inference.generate import stop_ids
from sftmix_ds.models import SMOLLM2_TOKENIZER, chat_template_text, load_tokenizer

IGNORE = -100

LLAMA31 = """{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set system = messages[0].content | trim %}
{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}
{{- system + '<|eot_id|>' }}
{%- for m in messages %}
{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""

QWEN25 = """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- for m in messages %}{%- if m.role != 'system' %}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

# Qwen3's own: an assistant turn after the last user turn gets a reasoning block (empty without
# reasoning); earlier turns' reasoning is dropped.
QWEN3 = """{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last=messages|length - 1, found=false) %}
{%- for m in messages[::-1] %}{%- if not ns.found and m.role == 'user' %}{%- set ns.found = true %}
{%- set ns.last = messages|length - 1 - loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'user' %}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n' }}
{%- elif m.role == 'assistant' %}
{%- set content = m.content %}{%- set reasoning = '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
{%- if loop.index0 > ns.last and (loop.last or reasoning) %}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endif %}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

# Gemma-3: no system role (the system text opens the first user turn); the assistant is "model".
GEMMA3 = """{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set prefix = messages[0].content + '\\n\\n' %}
{%- set messages = messages[1:] %}
{%- else %}{%- set prefix = '' %}{%- endif %}
{%- for m in messages %}{%- set role = 'model' if m.role == 'assistant' else m.role %}
{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + m.content | trim + '<end_of_turn>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"""

# Gemma-2 refuses a system turn outright.
GEMMA2 = """{{- bos_token }}{%- if messages[0].role == 'system' %}{{- raise_exception('System role not supported') }}
{%- endif %}""" + GEMMA3.split("{{- bos_token }}", 1)[1]

# Mistral-7B-Instruct-v0.3: no generation prompt (the prompt ends with [/INST]); the system text goes
# into the last user turn only, so a conversation ending with an answer never shows it.
MISTRAL = """{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}
{%- set messages = messages[1:] %}
{%- endif %}
{{- bos_token }}
{%- for m in messages %}
{%- if m.role == 'user' %}
{%- if loop.last and system is defined %}{{- '[INST] ' + system + '\\n\\n' + m.content + '[/INST]' }}
{%- else %}{{- '[INST] ' + m.content + '[/INST]' }}{%- endif %}
{%- else %}{{- ' ' + m.content | trim + eos_token }}{%- endif %}
{%- endfor %}"""

# Phi-3: <|end|> ends every turn; a conversation without a generation prompt ends with <|endoftext|>.
PHI3 = """{%- for m in messages %}{{- '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{%- endfor %}
{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- else %}{{- eos_token }}{%- endif %}"""

FAMILIES = {  # template, special tokens, bos, eos, end-of-turn marker, what precedes each answer
    "llama3.1": (LLAMA31, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                 "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", ""),
    "qwen2.5": (QWEN25, [], None, "<|im_end|>", "<|im_end|>", ""),
    "qwen3": (QWEN3, [], None, "<|im_end|>", "<|im_end|>", ""),
    "gemma3": (GEMMA3, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>", ""),
    "gemma2": (GEMMA2, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>", ""),
    "mistral-v0.3": (MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>", " "),
    "phi3": (PHI3, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], None, "<|endoftext|>", "<|end|>", ""),
}

SINGLE = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris is the capital of France."}]
MULTI = [*SINGLE, {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]
SYSTEM = [{"role": "system", "content": "Answer in one sentence."}, *MULTI]


def family_tokenizer(family):
    template, tokens, bos, eos, *_ = FAMILIES[family]
    tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    tokenizer.add_tokens(tokens, special_tokens=True)
    if bos:
        tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    tokenizer.chat_template = template
    return tokenizer


def supervised(tokenizer, messages):
    """The decoded text of each run of supervised tokens."""
    ids, labels = encode(tokenizer, messages, "conversation.jsonl:1")
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels))
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


def expected(family, messages):
    *_, marker, lead = FAMILIES[family]
    return [lead + m["content"] + marker for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("family", ["llama3.1", "qwen2.5", "gemma3", "phi3"])
@pytest.mark.parametrize("messages", [SINGLE, MULTI, SYSTEM], ids=["single", "multi", "system"])
def test_each_answer_and_its_end_marker_are_supervised(family, messages):
    assert supervised(family_tokenizer(family), messages) == expected(family, messages)


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_mistral_answers_without_a_system_prompt(messages):
    assert supervised(family_tokenizer("mistral-v0.3"), messages) == expected("mistral-v0.3", messages)


def test_mistral_system_prompt_is_refused_not_dropped():
    # The template shows the system text only in a prompt; a trained conversation would lose it silently.
    with pytest.raises(DataError, match=r"conversation.jsonl:1: .*prompt of assistant message 2 differently"):
        encode(family_tokenizer("mistral-v0.3"), [SYSTEM[0], *SINGLE], "conversation.jsonl:1")


def test_gemma2_refuses_a_system_turn_by_name():
    with pytest.raises(DataError, match="conversation.jsonl:1: the chat template rejects this conversation.*System.*"
                                        "put the system text at the start of the first user message, or leave it out"):
        encode(family_tokenizer("gemma2"), SYSTEM, "conversation.jsonl:1")
    folded = [{"role": "user", "content": SYSTEM[0]["content"] + "\n\n" + SYSTEM[1]["content"]}, *SYSTEM[2:]]
    assert supervised(family_tokenizer("gemma2"), folded) == expected("gemma2", folded)  # the way out trains
    assert supervised(family_tokenizer("gemma2"), MULTI) == expected("gemma2", MULTI)


def test_qwen3_single_turn_trains_the_reasoning_block_its_template_writes():
    assert supervised(family_tokenizer("qwen3"), SINGLE) == ["<think>\n\n</think>\n\n" + SINGLE[1]["content"]
                                                            + "<|im_end|>"]


def test_qwen3_multi_turn_is_refused_by_its_own_template_and_trained_by_the_shipped_one():
    tokenizer = family_tokenizer("qwen3")
    with pytest.raises(DataError, match="renders assistant message 1 differently once later turns follow.*"
                                        "model.chat_template=qwen3"):
        encode(tokenizer, MULTI, "conversation.jsonl:1")
    tokenizer.chat_template = chat_template_text("qwen3")
    reasoned = [MULTI[0], {"role": "assistant", "content": "<think>\nFrance: Paris.\n</think>\n\nParis."}, *MULTI[2:]]
    # The shipped template renders as Qwen3's own does (the earlier turn's reasoning is dropped)...
    assert tokenizer.apply_chat_template(reasoned, tokenize=False) == QWEN3_RENDERED
    # ...and marks each turn, so every answer is supervised.
    assert supervised(tokenizer, reasoned) == ["Paris.<|im_end|>", "<think>\n\n</think>\n\nRome.<|im_end|>"]


QWEN3_RENDERED = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                  "<|im_start|>assistant\nParis.<|im_end|>\n"
                  "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
                  "Rome.<|im_end|>\n")


def test_the_generation_mask_and_prefix_rendering_give_the_same_labels(tokenizer):
    """SmolLM2's template (prefix rendering) and the shipped ChatML one with {% generation %} markers
    render the same text; their labels must agree."""
    marked = transformers.AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    marked.chat_template = chat_template_text("chatml")
    for messages in ([SYSTEM[0], *SINGLE], SYSTEM):  # SmolLM2's adds a system turn where there is none
        assert marked.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
            messages, tokenize=False)
        assert encode(marked, messages, "x") == encode(tokenizer, messages, "x")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_stops_at_the_templates_end_of_turn_token(family):
    tokenizer = family_tokenizer(family)
    marker = FAMILIES[family][4]
    assert end_of_turn_token(tokenizer) == marker
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    stops = stop_ids(eos, tokenizer.convert_tokens_to_ids(marker))
    assert stops == ([eos] if marker == tokenizer.eos_token else [eos, tokenizer.convert_tokens_to_ids(marker)])


def test_a_model_without_a_chat_template_names_its_folder_and_the_key(tmp_path):
    plain = transformers.AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    plain.chat_template = None
    plain.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=f"{tmp_path}: the tokenizer has no chat template; set model.chat_template"):
        load_tokenizer(str(tmp_path))
    tokenizer, _ = load_tokenizer(str(tmp_path), "chatml")
    assert supervised(tokenizer, SINGLE) == ["Paris is the capital of France.<|im_end|>"]
    with pytest.raises(ConfigError, match="model.chat_template='nope': no such file, nor a shipped format"):
        load_tokenizer(str(tmp_path), "nope")


def test_the_generator_stops_at_end_of_turn_when_the_config_names_only_eos(tmp_path):
    """A Gemma-style folder whose generation_config names only <eos>: generation also stops at
    <end_of_turn>, else every answer would run on to max_new_tokens."""
    from sftmix_ds.inference import Generator

    tokenizer = family_tokenizer("gemma3")
    eos, end = tokenizer.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, eos_token_id=eos)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    generator = Generator(str(tmp_path), "cpu", None, max_new_tokens=2)
    assert generator.kwargs["eos_token_id"] == [eos, end]


ADD_TOOL = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}
TOOL_CHAT = [{"role": "user", "content": "1+2?"},
             {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "add",
                                                                                    "arguments": {"a": 1, "b": 2}}}]},
             {"role": "tool", "content": "3"}, {"role": "assistant", "content": "It is 3."}]
TOOL_SHAREGPT = {"tools": json.dumps([ADD_TOOL]), "conversations": [
    {"from": "human", "value": "1+2?"},
    {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1, "b": 2}}'},
    {"from": "observation", "value": "3"}, {"from": "gpt", "value": "It is 3."}]}


def test_tool_calls_are_trained_and_tool_results_are_not_in_both_record_formats(tmp_path, tokenizer):
    """With the shipped Qwen3 template (tools rendered as Qwen3 does): the trained tokens are exactly
    the call block and the answer, each with <|im_end|>; ShareGPT's function_call/observation and a
    tools column in JSON give the same ids and labels; a template without tools refuses by line."""
    from sftmix_ds.data import load_conversations, require_final_answer

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"tools": [ADD_TOOL], "messages": TOOL_CHAT}) + "\n")
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(json.dumps(TOOL_SHAREGPT) + "\n")
    qwen3, _ = load_tokenizer(SMOLLM2_TOKENIZER, chat_template="qwen3")
    (conv,), (same,) = load_conversations([str(chat)]), load_conversations([str(sharegpt)])
    ids, labels = encode(qwen3, conv.messages, conv.where, conv.tools)
    assert encode(qwen3, same.messages, same.where, same.tools) == (ids, labels)
    trained = qwen3.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert trained == ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>'
                       "<think>\n\n</think>\n\nIt is 3.<|im_end|>")
    assert '"description": "Add two integers"' in qwen3.decode(ids) and "<tool_response>\n3\n" in qwen3.decode(ids)
    with pytest.raises(DataError, match="chat.jsonl:1: a conversation with tools, which the chat template does not"):
        encode(tokenizer, conv.messages, conv.where, conv.tools)
    with pytest.raises(DataError, match="chat.jsonl:1: a conversation with tools; S3FT answers plain prompts"):
        require_final_answer([conv], "S3FT")
    call = lambda arguments: {"role": "assistant",
                              "tool_calls": [{"function": {"name": "add", "arguments": arguments}}]}
    bad = {"calls": ({"role": "assistant", "tool_calls": [{"function": {"name": "add"}}]}, "tool_calls\\[0\\]"),
           "not_json": (call("{{{not json"), "tool_calls\\[0\\].function.arguments is not valid JSON"),
           "not_object": (call("[1, 2]"), "tool_calls\\[0\\].function.arguments must be a JSON object"),
           "misplaced": ({"role": "user", "content": "x", "tool_call_id": "1"}, "'tool_call_id' belongs on a tool")}
    for name, (message, match) in bad.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"messages": [TOOL_CHAT[0], message, *TOOL_CHAT[2:]]}) + "\n")
        with pytest.raises(DataError, match=f"{name}.jsonl:1: messages\\[1\\]: .*{match}"):
            load_conversations([str(path)])
