"""Tokenization: chat template vs plain, BOS/EOS, masks, over-long policies."""

import re
import warnings

import numpy as np
import pytest

from jaxalign import data
from jaxalign.data import DataError, DataWarning
from tests._tokenizers import make_char_tokenizer


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("chat"), chat_template=True)


SFT = [
    {"prompt": "12+34=", "completion": "46"},
    {"prompt": b"Say hi.", "completion": b" hi!"},  # bytes, as TFDS returns text
    {"prompt": "", "completion": "free text"},
]


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def masked_text(tok, tokens, mask):
    return tok.decode(tokens[mask.astype(bool)].tolist())


def test_plain_sequence_is_bos_prompt_completion_eos(plain):
    out = data.tokenize_sft(SFT, plain, max_length=64)
    for record, seq, p_len in zip(SFT, out.tokens, out.prompt_lengths):
        prompt, completion = (data.tokenize._text(record[k]) for k in ("prompt", "completion"))
        expected = [plain.bos_token_id] + ids(plain, prompt) + ids(plain, completion) + [plain.eos_token_id]
        assert seq.dtype == np.int32 and seq.tolist() == expected
        assert p_len == 1 + len(prompt)
    assert out.stats == {"total": 3, "kept": 3, "truncated": 0, "dropped": 0}
    assert out.pad_id == plain.pad_token_id

    batch = data.collate_sequences(out.tokens, out.prompt_lengths, length=32, pad_id=out.pad_id)
    for row, record in enumerate(SFT):
        completion = data.tokenize._text(record["completion"])
        assert masked_text(plain, batch["tokens"][row], batch["loss_mask"][row]) == completion + "</s>"


def test_chat_template_prompt_matches_the_tokenizer(chat):
    out = data.tokenize_sft(SFT[:2], chat, max_length=64)
    for record, seq, p_len in zip(SFT, out.tokens, out.prompt_lengths):
        prompt = data.tokenize._text(record["prompt"])
        completion = data.tokenize._text(record["completion"])
        reference = chat.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=True)["input_ids"]
        assert seq[:p_len].tolist() == list(reference)
        assert chat.decode(seq[:p_len].tolist()) == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        assert seq[p_len:].tolist() == ids(chat, completion) + [chat.eos_token_id]
    batch = data.collate_sequences(out.tokens, out.prompt_lengths, length=48, pad_id=out.pad_id)
    assert masked_text(chat, batch["tokens"][0], batch["loss_mask"][0]) == "46<|im_end|>"


def test_chat_template_can_be_switched_off(chat, plain):
    out = data.tokenize_sft(SFT[:1], chat, max_length=64, use_chat_template=False)
    # The chat tokenizer has no BOS, so plain concatenation starts with the prompt.
    assert out.tokens[0].tolist() == ids(chat, "12+34=46") + [chat.eos_token_id]
    with pytest.raises(ValueError, match="no chat template"):
        data.tokenize_sft(SFT[:1], plain, max_length=64, use_chat_template=True)


def test_bos_policy(plain, chat):
    assert data.encode_prompts(plain, ["ab"], bos=False) == [ids(plain, "ab")]
    assert data.encode_prompts(plain, ["ab"], bos=True) == [[plain.bos_token_id] + ids(plain, "ab")]
    with pytest.raises(ValueError, match="no BOS"):
        data.encode_prompts(chat, ["ab"], bos=True, use_chat_template=False)


def test_eos_override(plain):
    out = data.tokenize_sft(SFT[:1], plain, max_length=64, eos_id=7)
    assert out.tokens[0][-1] == 7


def test_empty_prompt_first_token_is_never_a_target(plain):
    out = data.tokenize_sft(SFT[2:], plain, max_length=64, bos=False)
    assert out.prompt_lengths[0] == 0
    batch = data.collate_sequences(out.tokens, out.prompt_lengths, length=16, pad_id=0)
    assert batch["loss_mask"][0, 0] == 0 and batch["loss_mask"][0].tolist() == [0] + [1] * 9 + [0] * 6


def located(records, path="f.jsonl"):
    return [{**r, "source": path, "line": n} for n, r in enumerate(records, start=1)]


LONG = located([
    {"prompt": "ab", "completion": "cd"},            # 1 + 2 + 2 + 1 = 6 tokens
    {"prompt": "ab", "completion": "cdefghij"},      # 12 tokens
    {"prompt": "abcdefghijkl", "completion": "x"},   # prompt alone 13 tokens
    {"prompt": "a", "completion": "b"},
])


def test_overlong_error_names_file_and_line(plain):
    with pytest.raises(DataError, match=re.escape("f.jsonl:2: 12 tokens (prompt 3 + completion 9) > max_length=8")):
        data.tokenize_sft(LONG, plain, max_length=8)


def test_overlong_drop_warns_once(plain):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = data.tokenize_sft(LONG, plain, max_length=8, overlong="drop")
    ours = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(ours) == 1 and "2 of 4 samples exceed max_length=8" in str(ours[0].message)
    assert out.index.tolist() == [0, 3]
    assert out.stats == {"total": 4, "kept": 2, "truncated": 0, "dropped": 2}


def test_overlong_truncate_keeps_the_head(plain):
    with pytest.warns(DataWarning, match="1 truncated, 1 dropped") as caught:
        out = data.tokenize_sft(LONG, plain, max_length=8, overlong="truncate")
    assert len([w for w in caught if issubclass(w.category, DataWarning)]) == 1
    assert out.index.tolist() == [0, 1, 3]  # the prompt that fills max_length is dropped
    assert out.tokens[1].tolist() == ([plain.bos_token_id] + ids(plain, "abcdefghij"))[:8]
    assert all(len(t) <= 8 for t in out.tokens)


def test_nothing_left_is_an_error(plain):
    with pytest.raises(DataError, match="no samples left"):
        data.tokenize_sft(LONG[2:3], plain, max_length=8, overlong="drop")


def test_record_without_location_is_named_by_index(plain):
    with pytest.raises(DataError, match="record 1: 12 tokens"):
        data.tokenize_sft([{k: v for k, v in r.items() if k in ("prompt", "completion")} for r in LONG],
                          plain, max_length=8)
    with pytest.raises(DataError, match="record 0: missing field 'completion'"):
        data.tokenize_sft([{"prompt": "a"}], plain, max_length=8)


def test_preference_shares_the_prompt(chat):
    pairs = [{"prompt": "2+2?", "chosen": "4", "rejected": "five"}]
    out = data.tokenize_preference(pairs, chat, max_length=64)
    p = out.prompt_lengths[0]
    assert out.chosen[0][:p].tolist() == out.rejected[0][:p].tolist()
    assert out.chosen[0][p:].tolist() == ids(chat, "4") + [chat.eos_token_id]
    assert out.rejected[0][p:].tolist() == ids(chat, "five") + [chat.eos_token_id]
    batch = data.collate_preference(out.chosen, out.rejected, out.prompt_lengths, length=40, pad_id=0)
    assert masked_text(chat, batch["chosen_tokens"][0], batch["chosen_loss_mask"][0]) == "4<|im_end|>"
    assert masked_text(chat, batch["rejected_tokens"][0], batch["rejected_loss_mask"][0]) == "five<|im_end|>"


def test_preference_overlong_is_judged_on_the_longer_response(plain):
    pairs = located([{"prompt": "p", "chosen": "a", "rejected": "bbbbbbbbbb"}], "pairs.jsonl")
    with pytest.raises(DataError, match=re.escape("pairs.jsonl:1: 13 tokens (prompt 2 + rejected 11)")):
        data.tokenize_preference(pairs, plain, max_length=8)
    with pytest.warns(DataWarning, match="1 truncated"):
        out = data.tokenize_preference(pairs, plain, max_length=8, overlong="truncate")
    assert len(out.chosen[0]) == 4 and len(out.rejected[0]) == 8


def test_prompts_keep_answers_and_truncate_from_the_left(plain):
    rows = located([{"prompt": "abcdefghij", "answer": "42"}, {"prompt": "xy", "answer": b"7"}])
    with pytest.raises(DataError, match="f.jsonl:1: 11 tokens"):
        data.tokenize_prompts(rows, plain, max_length=6)
    with pytest.warns(DataWarning, match="1 truncated"):
        out = data.tokenize_prompts(rows, plain, max_length=6, overlong="truncate")
    assert out.tokens[0].tolist() == ids(plain, "efghij")
    assert out.tokens[1].tolist() == [plain.bos_token_id] + ids(plain, "xy")
    assert out.answers == ["42", "7"] and out.prompts == ["abcdefghij", "xy"]


def test_bad_arguments(plain):
    with pytest.raises(ValueError, match="overlong="):
        data.tokenize_sft(SFT, plain, max_length=8, overlong="clip")
    with pytest.raises(ValueError, match="bos="):
        data.tokenize_sft(SFT, plain, max_length=64, bos="yes")
