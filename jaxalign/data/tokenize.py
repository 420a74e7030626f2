"""Tokenization of samples with the model's Hugging Face tokenizer.

Sequences are built as follows (ids, never re-tokenized text, so the prompt /
completion boundary is exact):

- With a chat template (the tokenizer has one and `use_chat_template` is not
  False): prompt = the template applied to `[{"role": "user", "content":
  prompt}]` with `add_generation_prompt=True`, tokenized without extra
  special tokens (the template itself writes any BOS).
- Without: prompt = [BOS] + tokens(prompt). BOS policy `bos`: `"auto"` adds
  the tokenizer's BOS if it has one, `True` requires one, `False` never adds.
- Response (completion, chosen, rejected) = tokens(response) + [EOS], no
  separator: a space or newline between prompt and response is the data's.
  For chat models EOS should be the end-of-turn token (it is for ChatML
  instruct tokenizers, whose `eos_token` is `<|im_end|>`); `eos_id` overrides.

`max_length` bounds prompt + response + EOS. The `overlong` policy:
- `"error"` (default): raise `DataError` naming the sample (file:line).
- `"drop"`: leave the sample out.
- `"truncate"`: keep the first `max_length` tokens (the response loses its
  tail and its EOS); a sample whose prompt alone leaves no room for one
  response token is dropped. RL prompts keep their *last* `max_length`
  tokens, so the generation prompt survives.
Whatever was truncated or dropped is counted in `stats` and reported in one
`DataWarning` per call.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxalign.data.records import DataError, DataWarning

OVERLONG_POLICIES = ("truncate", "drop", "error")
_CHUNK = 1024


@dataclasses.dataclass
class SFTData:
    """Tokenized SFT samples.

    tokens: per sample, int32 prompt + completion + EOS.
    prompt_lengths: [N] number of prompt tokens of each sample.
    index: [N] position of each sample in the source (drops leave gaps).
    """

    tokens: list[np.ndarray]
    prompt_lengths: np.ndarray
    index: np.ndarray
    max_length: int
    pad_id: int
    stats: dict[str, int]

    def __len__(self) -> int:
        return len(self.tokens)

    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], np.int32)


@dataclasses.dataclass
class PreferenceData:
    """Tokenized preference pairs; chosen and rejected share the prompt.

    chosen, rejected: per pair, int32 prompt + response + EOS.
    prompt_lengths: [N] prompt tokens (the same in both sequences).
    """

    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    prompt_lengths: np.ndarray
    index: np.ndarray
    max_length: int
    pad_id: int
    stats: dict[str, int]

    def __len__(self) -> int:
        return len(self.chosen)

    def lengths(self) -> np.ndarray:
        return np.array([max(len(c), len(r)) for c, r in zip(self.chosen, self.rejected)], np.int32)


@dataclasses.dataclass
class PromptData:
    """Tokenized RL prompts with their answers (and prompt texts) as strings."""

    tokens: list[np.ndarray]
    prompts: list[str]
    answers: list[str]
    index: np.ndarray
    max_length: int
    pad_id: int
    stats: dict[str, int]

    def __len__(self) -> int:
        return len(self.tokens)

    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], np.int32)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _where(record: dict[str, Any], i: int) -> str:
    if "source" in record and "line" in record:
        return f"{_text(record['source'])}:{int(record['line'])}"
    return f"record {i}"


def _read(source: Sequence[Any], keys: list[int]) -> list[Any]:
    """Records `keys` of `source`, batched where the source can (array_record
    decodes a batch about twice as fast); TFDS's mock sources cannot."""
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None:
        try:
            return list(getitems(keys))
        except TypeError:
            pass
    return [source[i] for i in keys]


def _chunks(source: Sequence[Any], fields: tuple[str, ...]) -> Iterator[list[tuple[int, str, dict]]]:
    """Yields lists of (index, where, {field: str}) of `source`."""
    for start in range(0, len(source), _CHUNK):
        keys = list(range(start, min(start + _CHUNK, len(source))))
        chunk = []
        for i, record in zip(keys, _read(source, keys)):
            missing = [f for f in fields if f not in record]
            if missing:
                raise DataError(f"{_where(record, i)}: missing field {missing[0]!r}")
            chunk.append((i, _where(record, i), {f: _text(record[f]) for f in fields}))
        yield chunk


def pad_id_of(tokenizer: Any) -> int:
    """The pad id: the tokenizer's pad token, else its EOS (padding is masked anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(tokenizer.eos_token_id)


def _use_template(tokenizer: Any, use_chat_template: bool | None) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        return has
    if use_chat_template and not has:
        raise ValueError("use_chat_template=True but the tokenizer has no chat template")
    return bool(use_chat_template)


def _bos_prefix(tokenizer: Any, bos: bool | str) -> list[int]:
    if bos == "auto":
        return [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    if bos is True:
        if tokenizer.bos_token_id is None:
            raise ValueError("bos=True but the tokenizer has no BOS token")
        return [int(tokenizer.bos_token_id)]
    if bos is False:
        return []
    raise ValueError(f"bos={bos!r}; expected 'auto', True or False")


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    use_chat_template: bool | None = None,
    bos: bool | str = "auto",
) -> list[list[int]]:
    """Token ids of prompts, ready for the response (see the module docstring)."""
    prompts = list(prompts)
    if not prompts:
        return []
    if _use_template(tokenizer, use_chat_template):
        texts = tokenizer.apply_chat_template(
            [[{"role": "user", "content": p}] for p in prompts],
            add_generation_prompt=True,
            tokenize=False,
        )
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    prefix = _bos_prefix(tokenizer, bos)
    return [prefix + list(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def encode_responses(tokenizer: Any, responses: Sequence[str], *, eos_id: int) -> list[list[int]]:
    """Token ids of responses, each followed by `eos_id`."""
    responses = list(responses)
    if not responses:
        return []
    return [list(ids) + [eos_id] for ids in tokenizer(responses, add_special_tokens=False)["input_ids"]]


def _eos(tokenizer: Any, eos_id: int | None) -> int:
    if eos_id is not None:
        return int(eos_id)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; pass eos_id")
    return int(tokenizer.eos_token_id)


def _check(max_length: int, overlong: str) -> None:
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong={overlong!r}; expected one of {OVERLONG_POLICIES}")
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2")


class _Overlong:
    """Applies the overlong policy and reports its effect once."""

    def __init__(self, what: str, max_length: int, policy: str):
        self.what, self.max_length, self.policy = what, max_length, policy
        self.total = self.truncated = self.dropped = 0

    def excess(self, where: str, n: int, detail: str) -> None:
        if self.policy == "error":
            raise DataError(
                f"{where}: {n} tokens ({detail}) > max_length={self.max_length} "
                "(overlong='error'; pass overlong='truncate' or 'drop')"
            )

    def finish(self, kept: int) -> dict[str, int]:
        stats = {"total": self.total, "kept": kept, "truncated": self.truncated, "dropped": self.dropped}
        if kept == 0:
            raise DataError(f"{self.what}: no samples left of {self.total} "
                            f"(max_length={self.max_length}, overlong={self.policy!r})")
        if self.truncated or self.dropped:
            warnings.warn(
                DataWarning(
                    f"{self.what}: {self.truncated + self.dropped} of {self.total} samples exceed "
                    f"max_length={self.max_length} (overlong={self.policy!r}): "
                    f"{self.truncated} truncated, {self.dropped} dropped"
                ),
                stacklevel=3,
            )
        return stats


def _fit_pair(prompt: list[int], response: list[int], policy: _Overlong, where: str, name: str):
    """Returns prompt + response under the policy, or None to drop it."""
    n = len(prompt) + len(response)
    if n <= policy.max_length:
        return prompt + response
    policy.excess(where, n, f"prompt {len(prompt)} + {name} {len(response)}")
    if policy.policy == "drop" or len(prompt) >= policy.max_length:
        return None
    return (prompt + response)[: policy.max_length]


def tokenize_sft(
    source: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    overlong: str = "error",
    use_chat_template: bool | None = None,
    bos: bool | str = "auto",
    eos_id: int | None = None,
) -> SFTData:
    """Tokenizes `{"prompt", "completion"}` records (any random-access source)."""
    _check(max_length, overlong)
    eos = _eos(tokenizer, eos_id)
    policy = _Overlong("tokenize_sft", max_length, overlong)
    tokens, prompt_lengths, index = [], [], []
    for chunk in _chunks(source, ("prompt", "completion")):
        prompts = encode_prompts(tokenizer, [r["prompt"] for _, _, r in chunk],
                                 use_chat_template=use_chat_template, bos=bos)
        completions = encode_responses(tokenizer, [r["completion"] for _, _, r in chunk], eos_id=eos)
        for (i, where, _), p, c in zip(chunk, prompts, completions):
            policy.total += 1
            seq = _fit_pair(p, c, policy, where, "completion")
            if seq is None:
                policy.dropped += 1
                continue
            policy.truncated += len(seq) < len(p) + len(c)
            tokens.append(np.asarray(seq, np.int32))
            prompt_lengths.append(len(p))
            index.append(i)
    stats = policy.finish(len(tokens))
    return SFTData(tokens, np.asarray(prompt_lengths, np.int32), np.asarray(index, np.int64),
                   max_length, pad_id_of(tokenizer), stats)


def tokenize_preference(
    source: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    overlong: str = "error",
    use_chat_template: bool | None = None,
    bos: bool | str = "auto",
    eos_id: int | None = None,
) -> PreferenceData:
    """Tokenizes `{"prompt", "chosen", "rejected"}` records.

    A pair is over-long if either sequence is; truncation cuts each sequence
    to `max_length` on its own.
    """
    _check(max_length, overlong)
    eos = _eos(tokenizer, eos_id)
    policy = _Overlong("tokenize_preference", max_length, overlong)
    chosen, rejected, prompt_lengths, index = [], [], [], []
    for chunk in _chunks(source, ("prompt", "chosen", "rejected")):
        prompts = encode_prompts(tokenizer, [r["prompt"] for _, _, r in chunk],
                                 use_chat_template=use_chat_template, bos=bos)
        goods = encode_responses(tokenizer, [r["chosen"] for _, _, r in chunk], eos_id=eos)
        bads = encode_responses(tokenizer, [r["rejected"] for _, _, r in chunk], eos_id=eos)
        for (i, where, _), p, c, r in zip(chunk, prompts, goods, bads):
            policy.total += 1
            longer, name = (c, "chosen") if len(c) >= len(r) else (r, "rejected")
            if _fit_pair(p, longer, policy, where, name) is None:
                policy.dropped += 1
                continue
            seq_c = (p + c)[:max_length]
            seq_r = (p + r)[:max_length]
            policy.truncated += len(seq_c) < len(p) + len(c) or len(seq_r) < len(p) + len(r)
            chosen.append(np.asarray(seq_c, np.int32))
            rejected.append(np.asarray(seq_r, np.int32))
            prompt_lengths.append(len(p))
            index.append(i)
    stats = policy.finish(len(chosen))
    return PreferenceData(chosen, rejected, np.asarray(prompt_lengths, np.int32),
                          np.asarray(index, np.int64), max_length, pad_id_of(tokenizer), stats)


def tokenize_prompts(
    source: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    max_length: int,
    overlong: str = "error",
    use_chat_template: bool | None = None,
    bos: bool | str = "auto",
) -> PromptData:
    """Tokenizes `{"prompt", "answer"}` records for generation.

    `max_length` bounds the prompt; truncation keeps its last tokens.
    """
    _check(max_length, overlong)
    policy = _Overlong("tokenize_prompts", max_length, overlong)
    tokens, prompts, answers, index = [], [], [], []
    for chunk in _chunks(source, ("prompt", "answer")):
        encoded = encode_prompts(tokenizer, [r["prompt"] for _, _, r in chunk],
                                 use_chat_template=use_chat_template, bos=bos)
        for (i, where, record), p in zip(chunk, encoded):
            policy.total += 1
            if len(p) > max_length:
                policy.excess(where, len(p), "prompt")
                if overlong == "drop":
                    policy.dropped += 1
                    continue
                p = p[-max_length:]
                policy.truncated += 1
            tokens.append(np.asarray(p, np.int32))
            prompts.append(record["prompt"])
            answers.append(record["answer"])
            index.append(i)
    stats = policy.finish(len(tokens))
    return PromptData(tokens, prompts, answers, np.asarray(index, np.int64),
                      max_length, pad_id_of(tokenizer), stats)
