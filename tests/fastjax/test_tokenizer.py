"""fastjax.tokenizer.Tokenizer against transformers' AutoTokenizer on the same files.

A tiny byte-level BPE is trained in the test (no downloads); ids, decoding, chat templates,
assistant masks and save_pretrained round trips must equal transformers 5 exactly (ids are ints,
templates are strings: the tolerance is zero).
"""

from __future__ import annotations

import json
import random

import jinja2
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from fastjax.tokenizer import Tokenizer

import transformers

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Same output as CHATML, with the assistant reply + end marker inside {% generation %}.
CHATML_GEN = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Exercises bos_token, tools|tojson, loop controls, trim/lstrip_blocks, raise_exception.
FANCY = """{{ bos_token }}
{% if tools %}
    Tools: {{ tools | tojson }}
{% endif %}
{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role ' + m['role']) }}
    {% endif %}
    {% if m['role'] == 'system' and not loop.first %}{% continue %}{% endif %}
    [{{ m['role'] | upper }}] {{ m['content'] | trim }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}

{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs! 12345 67890",
    "Héllo wörld, naïve café — déjà vu. 日本語のテキスト 🤗🚀",
    "def f(x):\n    return x * 2  # comment\n\n\ttabs\tand  spaces",
    "JAX and Pallas kernels fine-tune language models quickly.",
]
TEXTS = [
    "",
    "hello world",
    "The  quick\tbrown\n\nfox   ",
    "12345 + 0.5 = 12345.5; 007",
    "naïve café 日本語 🤗 emoji🚀",
    "<|im_start|>user\nhi<|im_end|> trailing <|endoftext|>",
    "   leading spaces and CAPS",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? Explain   briefly."},
    {"role": "assistant", "content": "4. Because 2 and 2 make 4."},
    {"role": "user", "content": "And ünïcödé 🤗?"},
    {"role": "assistant", "content": "Still fine.\n\nBye"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "a<b & c",
            "parameters": {"type": "object", "properties": {"x": {"type": "number"}}},
        },
    }
]


def _train_backend(*, add_bos: bool) -> BackendTokenizer:
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A",
            pair="<|im_start|> $A <|im_start|> $B",
            special_tokens=[("<|im_start|>", tok.token_to_id("<|im_start|>"))],
        )
    return tok


def _write_dir(path, *, add_bos: bool, template: str | None = CHATML, pad: str | None = None):
    _train_backend(add_bos=add_bos).save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "model_max_length": 2048,
    }
    if pad is not None:
        config["pad_token"] = pad
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["no_bos", "bos_post_processor"])
def pair(request, tmp_path_factory):
    d = _write_dir(tmp_path_factory.mktemp("tok"), add_bos=request.param)
    return Tokenizer.from_pretrained(d), transformers.AutoTokenizer.from_pretrained(d), d


def test_encode_decode_match_transformers(pair):
    ours, ref, _ = pair
    rng = random.Random(0)
    texts = TEXTS + [
        "".join(rng.choice("ab c1\n🤗é<>|") for _ in range(rng.randint(1, 40))) for _ in range(5)
    ]
    for text in texts:
        for special in (True, False):
            want = ref(text, add_special_tokens=special)["input_ids"]
            assert ours.encode(text, add_special_tokens=special) == want, (text, special)
        ids = ours.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            ), (text, skip)
    assert ours.encode_batch(texts) == [ref(t)["input_ids"] for t in texts]


def test_special_ids_and_sizes(pair):
    ours, ref, _ = pair
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id)
    assert ours.pad_token_id is not None and ours.pad_token_id == ours.eos_token_id  # fallback
    assert ref.pad_token_id is None
    assert ours.vocab_size == ref.vocab_size and len(ours) == len(ref)
    assert ours.add_bos_token == (ref("x")["input_ids"][0] == ref.bos_token_id)
    assert ours.model_max_length == 2048


@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_chat_template_matches_transformers(pair, gen, n):
    ours, ref, _ = pair
    msgs = MESSAGES[:n]
    want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == want
    want_ids = ref.apply_chat_template(
        msgs, tokenize=True, add_generation_prompt=gen, return_dict=False
    )
    assert ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True) == want_ids


def test_fancy_template_tools_tojson_raise(pair):
    ours, ref, _ = pair
    for tools in (None, TOOLS):
        for gen in (False, True):
            want = ref.apply_chat_template(
                MESSAGES,
                tools=tools,
                tokenize=False,
                add_generation_prompt=gen,
                chat_template=FANCY,
                custom_flag=1,
            )
            got = ours.apply_chat_template(
                MESSAGES, tools=tools, add_generation_prompt=gen, chat_template=FANCY, custom_flag=1
            )
            assert got == want
    assert '"a<b & c"' in ours.apply_chat_template(MESSAGES, tools=TOOLS, chat_template=FANCY)
    bad = [{"role": "robot", "content": "x"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role robot"):
        ours.apply_chat_template(bad, chat_template=FANCY)
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role robot"):
        ref.apply_chat_template(bad, chat_template=FANCY, tokenize=False)


def _assistant_texts(tok, ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


@pytest.mark.parametrize("n", [3, 5])
def test_assistant_mask_generation_tag_matches_transformers(pair, n):
    ours, ref, _ = pair
    msgs = MESSAGES[:n]
    ids, mask = ours.apply_chat_template_with_assistant_mask(msgs, chat_template=CHATML_GEN)
    out = ref.apply_chat_template(
        msgs,
        chat_template=CHATML_GEN,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert ids == out["input_ids"] and mask == out["assistant_masks"]
    want = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert _assistant_texts(ours, ids, mask) == want


@pytest.mark.parametrize("n", [3, 5])
def test_assistant_mask_by_prefix_diff(pair, n):
    ours, _, _ = pair
    msgs = MESSAGES[:n]
    ids, mask = ours.apply_chat_template_with_assistant_mask(msgs)
    assert ids == ours.apply_chat_template(msgs, tokenize=True)
    want = [m["content"] + "<|im_end|>" for m in msgs if m["role"] == "assistant"]
    assert _assistant_texts(ours, ids, mask) == want
    # Both methods agree on a template whose {% generation %} covers reply + end marker.
    assert (ids, mask) == ours.apply_chat_template_with_assistant_mask(
        msgs, chat_template=CHATML_GEN
    )


def test_assistant_mask_rejects_non_prefix_stable_template(pair):
    ours, _, _ = pair
    # Drops every assistant turn but the last: rendering a prefix is not a prefix of the whole.
    t = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="prefix-stable at message 2"):
        ours.apply_chat_template_with_assistant_mask(MESSAGES, chat_template=t)


def test_save_pretrained_round_trip(pair, tmp_path):
    ours, ref, _ = pair
    out = tmp_path / "saved"
    ours.save_pretrained(out)
    assert (out / "chat_template.jinja").read_text() == CHATML
    again = Tokenizer.from_pretrained(out)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        want = ref(text)["input_ids"]
        assert again.encode(text) == want and hf(text)["input_ids"] == want, text
    assert hf.chat_template == CHATML == again.chat_template
    assert hf.apply_chat_template(MESSAGES, tokenize=False) == ours.apply_chat_template(MESSAGES)
    assert (hf.bos_token, hf.eos_token) == (ours.bos_token, ours.eos_token)
    assert again.add_bos_token == ours.add_bos_token and again.model_max_length == 2048
    # ...and what transformers itself saves (added_tokens_decoder, its chat_template.jinja) loads.
    ref.save_pretrained(tmp_path / "hf_saved")
    from_hf = Tokenizer.from_pretrained(tmp_path / "hf_saved")
    for text in TEXTS:
        assert from_hf.encode(text) == ref(text)["input_ids"], text
    assert from_hf.apply_chat_template(MESSAGES, add_generation_prompt=True) == (
        ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    )


def test_constructor_add_bos_eos_and_named_templates(tmp_path):
    backend = _train_backend(add_bos=False)
    tok = Tokenizer(
        backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        add_bos_token=True,
        add_eos_token=True,
        chat_template={"default": CHATML, "tool_use": FANCY},
    )
    ids = tok.encode("hello world")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.encode("hello world", add_special_tokens=False) == ids[1:-1]
    assert tok.pad_token_id == backend.token_to_id("<|endoftext|>") != tok.eos_token_id
    assert backend.post_processor is None  # the caller's backend is not mutated
    # A tools call picks the "tool_use" template, as transformers does.
    assert tok.apply_chat_template(MESSAGES[:2], tools=TOOLS).startswith(
        "<|im_start|>\n    Tools: ["
    )
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "additional_chat_templates" / "tool_use.jinja").read_text() == FANCY
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf("hello world")["input_ids"] == ids
    assert hf.apply_chat_template(
        MESSAGES[:2], tools=TOOLS, tokenize=False
    ) == tok.apply_chat_template(MESSAGES[:2], tools=TOOLS)
    assert Tokenizer.from_pretrained(tmp_path).chat_templates == tok.chat_templates


def test_legacy_chat_template_json_and_errors(tmp_path):
    (tmp_path / "a").mkdir()
    d = _write_dir(tmp_path / "a", add_bos=False, template=None)
    tok = Tokenizer.from_pretrained(d)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)
    (d / "chat_template.json").write_text(json.dumps({"chat_template": CHATML}))
    assert Tokenizer.from_pretrained(d).chat_template == CHATML
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in .*missing_dir"):
        Tokenizer.from_pretrained(tmp_path / "missing_dir")
    with pytest.raises(ValueError, match="empty conversation"):
        Tokenizer.from_pretrained(d).apply_chat_template([])
