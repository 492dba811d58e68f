import pytest

from alignment.tokenizer import CHATML_TEMPLATE, load_tokenizer

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


def test_assistant_mask_covers_exactly_the_assistant_tokens(tokenizer):
    out = tokenizer.apply_chat_template(MESSAGES, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = [i for i, m in zip(ids, mask) if m]
    expected = tokenizer.encode("42<|im_end|>") + tokenizer.encode("It is 2.<|im_end|>")
    assert masked == expected
    # The masked spans are contiguous and start right after "<|im_start|>assistant\n".
    header = tokenizer.encode("<|im_start|>assistant\n")
    starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
    assert len(starts) == 2
    for s in starts:
        assert ids[s - len(header) : s] == header


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


def test_checkpoint_tokenizer_loads_and_gets_generation_markers(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "ours")
    loaded = load_tokenizer(str(tmp_path / "ours"))
    assert loaded.chat_template == CHATML_TEMPLATE
    assert loaded.encode("Hello world") == [9707, 1879]
    # A Hub-style checkpoint: ChatML without generation markers gets ours.
    loaded.chat_template = CHATML_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    loaded.save_pretrained(tmp_path / "hub")
    again = load_tokenizer(str(tmp_path / "hub"))
    assert again.chat_template == CHATML_TEMPLATE
    out = again.apply_chat_template(MESSAGES[:2], return_dict=True, return_assistant_tokens_mask=True)
    assert sum(out["assistant_masks"]) == 3
