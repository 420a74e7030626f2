"""Tiny Hugging Face tokenizers built offline, for tests.

    tok = make_char_tokenizer(tmp_path / "tok")                      # plain
    chat = make_char_tokenizer(tmp_path / "chat", chat_template=True)  # ChatML

One token per character of `string.printable` (anything else is `<unk>`),
plus special tokens. Both are saved with `save_pretrained` and loaded back
through `AutoTokenizer.from_pretrained`, as a real checkpoint would be.

- plain: bos `<s>`, eos `</s>`, pad `<pad>`, no chat template.
- chat: ChatML template (`CHAT_TEMPLATE`), eos `<|im_end|>` (the end of an
  assistant turn, as in ChatML instruct models), pad `<pad>`, no bos.
"""

from __future__ import annotations

import os
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CHARS = tuple(string.printable)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def vocab() -> dict[str, int]:
    """Token -> id: the special tokens first (`<pad>` is 0), then the characters."""
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARS)}


def make_char_tokenizer(path: str | os.PathLike, chat_template: bool = False) -> PreTrainedTokenizerFast:
    """Saves a character-level tokenizer to `path` and returns it loaded from there."""
    core = Tokenizer(models.WordLevel(vocab=vocab(), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    if chat_template:
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=core, eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
        )
        wrapped.chat_template = CHAT_TEMPLATE
    else:
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    wrapped.save_pretrained(os.fspath(path))
    return AutoTokenizer.from_pretrained(os.fspath(path))
