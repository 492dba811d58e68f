import logging

import pytest

from alignment.tokenizer import CHATML_TEMPLATE, TokenizerError, load_tokenizer

MESSAGES = [
    {"role": "user", "content": "What is 12+30?"},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "And 1+1?"},
    {"role": "assistant", "content": "It is 2."},
]


def test_size_and_control_tokens(tokenizer):
    assert len(tokenizer) == 151_646
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [151643, 151644, 151645]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    # Control tokens are atomic inside text, never split into bytes.
    assert tokenizer.encode("a<|im_end|>b") == [tokenizer.encode("a")[0], 151645, tokenizer.encode("b")[0]]


def test_known_ids_match_released_qwen2(tokenizer):
    # Ids of the released Qwen2 tokenizer for these strings.
    assert tokenizer.encode("Hello world") == [9707, 1879]
    assert tokenizer.encode("\n") == [198]


def test_chatml_rendering_exact(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 12+30?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}] + MESSAGES[:2]
    text = tokenizer.apply_chat_template(with_system, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 12+30?<|im_end|>\n"
        "<|im_start|>assistant\n42<|im_end|>\n"
    )


def _assert_mask_is_the_assistant_turns(tokenizer, messages):
    """return_assistant_tokens_mask marks each assistant turn's content and <|im_end|>, nothing else."""
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    turns = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [i for i, m in zip(ids, mask) if m] == [t for turn in turns for t in tokenizer.encode(turn)]
    # The masked spans are contiguous and start right after "<|im_start|>assistant\n".
    header = tokenizer.encode("<|im_start|>assistant\n")
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    assert len(starts) == len(turns)
    for s in starts:
        assert ids[s - len(header) : s] == header


def test_assistant_mask_covers_exactly_the_assistant_tokens(tokenizer):
    _assert_mask_is_the_assistant_turns(tokenizer, MESSAGES)


@pytest.mark.parametrize(
    "text",
    [
        "안녕하세요, 세계! 오늘 날씨가 좋네요.",
        "你好，世界！今天天气很好。",
        "مرحبا بالعالم، كيف حالك اليوم؟",
        "สวัสดีชาวโลก วันนี้อากาศดีมาก",
        "Привет, мир! Как дела?",
        "def f(x: int) -> int:\n\treturn x ** 2  # square 😀\n\n\nprint(f(3))\r\n",
    ],
)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_split_one_by_one(tokenizer):
    tokens = tokenizer.tokenize("x = 1234567890")
    assert tokens[-10:] == list("1234567890")
    assert all(len(tokenizer.tokenize(str(n))) == len(str(n)) for n in (7, 42, 31415, 1000000))


# Qwen2-Instruct's chat template, as its tokenizer_config.json ships it: no generation markers.
QWEN2_INSTRUCT_TEMPLATE = (
    r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    r"{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MARKABLE = {
    "qwen2-instruct": QWEN2_INSTRUCT_TEMPLATE,
    # Another default system prompt and '<|im_end|>\n' as one literal: what is kept is the checkpoint's own.
    "own-system-prompt": QWEN2_INSTRUCT_TEMPLATE.replace("You are a helpful assistant.", "You are Qwen.")
    .replace("'<|im_end|>' + '\\n'", '"<|im_end|>\\n"'),
    # Our ChatML with its markers taken out: the assistant branch and the generic one both get rewritten.
    "ours-unmarked": CHATML_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", ""),
}
UNMARKABLE = {
    "not-chatml": "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
                  "{% endfor %}",
    "content-and-end-apart": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
                             "{{ message['content'] }}{{ '<|im_end|>\\n' }}{% endfor %}",
    # Users through the markable expression, assistants apart: marking it would miss every assistant turn.
    "assistants-apart": "{% for message in messages %}{% if message['role'] == 'assistant' %}"
                        "{{ '<|im_start|>assistant\\n' + message['content'] }}{{ '<|im_end|>\\n' }}{% else %}"
                        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
                        "{% endif %}{% endfor %}",
}


def _checkpoint(tokenizer, path, template: str) -> str:
    tokenizer.save_pretrained(path)
    saved = load_tokenizer(str(path))  # the tokenizer files written, then the template replaced, as on the Hub
    saved.chat_template = template
    saved.save_pretrained(path)
    return str(path)


def test_a_checkpoint_whose_template_has_markers_is_untouched(tokenizer, tmp_path, caplog):
    tokenizer.save_pretrained(tmp_path / "ours")
    with caplog.at_level(logging.INFO, logger="alignment.tokenizer"):
        loaded = load_tokenizer(str(tmp_path / "ours"))
    assert loaded.chat_template == CHATML_TEMPLATE and not caplog.records
    assert loaded.encode("Hello world") == [9707, 1879]


@pytest.mark.parametrize("name", list(MARKABLE))
def test_a_checkpoint_keeps_its_own_template_with_generation_markers_added(tokenizer, tmp_path, caplog, name):
    original = MARKABLE[name]
    path = _checkpoint(tokenizer, tmp_path / name, original)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignment.tokenizer"):
        loaded = load_tokenizer(path)
    assert [r.levelno for r in caplog.records] == [logging.INFO] and path in caplog.records[0].getMessage()
    assert "{% generation %}" in loaded.chat_template
    with_system = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    for messages in (MESSAGES, with_system, MESSAGES[:1], MESSAGES[:3]):
        for add_generation_prompt in (False, True):
            kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
            ours = loaded.apply_chat_template(messages, **kw)
            assert ours == loaded.apply_chat_template(messages, chat_template=original, **kw)
    _assert_mask_is_the_assistant_turns(loaded, MESSAGES)
    _assert_mask_is_the_assistant_turns(loaded, with_system)


@pytest.mark.parametrize("name", list(UNMARKABLE))
def test_a_template_that_cannot_be_marked_is_kept_with_one_warning(tokenizer, tmp_path, caplog, name):
    path = _checkpoint(tokenizer, tmp_path / name, UNMARKABLE[name])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alignment.tokenizer"):
        loaded = load_tokenizer(path)
    assert loaded.chat_template == UNMARKABLE[name]
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    message = caplog.records[0].getMessage()
    assert message.startswith(path) and "assistant-only loss needs them" in message and "\n" not in message


def test_a_folder_without_tokenizer_files_is_refused_not_read_as_an_empty_vocabulary(tokenizer, tmp_path):
    """transformers loads a model folder with no tokenizer files as a tokenizer of one token that encodes every
    text to nothing (a reward model saved without its tokenizer scored empty inputs); it is refused by name."""
    tokenizer.save_pretrained(tmp_path / "with")
    assert load_tokenizer(str(tmp_path / "with"))("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    (tmp_path / "without").mkdir()
    (tmp_path / "without" / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(TokenizerError, match=f"{tmp_path / 'without'}: no tokenizer files"):
        load_tokenizer(str(tmp_path / "without"))
