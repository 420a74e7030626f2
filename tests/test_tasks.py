"""The built-in arithmetic task: tokenizer asset, answers, held-out split, verifier."""

import filecmp

import numpy as np

from jaxalign.rewards import exact_match
from jaxalign.tasks import arithmetic


def test_shipped_tokenizer_is_what_build_tokenizer_writes(tmp_path):
    arithmetic.build_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(tmp_path / name, arithmetic.TOKENIZER_DIR / name, shallow=False), name


def test_tokenizer_round_trips_characters():
    tok = arithmetic.load_tokenizer()
    assert len(tok) == 14 and tok.pad_token_id == 0 and tok.eos_token_id == 1
    ids = tok("407+96=")["input_ids"]
    assert ids == [2 + 4, 2 + 0, 2 + 7, 12, 2 + 9, 2 + 6, 13]
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == "407+96="


def test_answers_are_reversed_sums():
    assert arithmetic.answer(123, 45) == "861"
    assert arithmetic.answer(999, 999) == "8991"
    assert arithmetic.max_answer_len() == 5 and arithmetic.max_prompt_len() == 8


def test_held_out_split_is_disjoint_and_fixed():
    rng = np.random.default_rng(0)
    train = arithmetic.sample_problems(rng, 5000)
    test = arithmetic.held_out(1000)
    assert not arithmetic.is_held_out(train.a, train.b).any()
    assert arithmetic.is_held_out(test.a, test.b).all()
    assert test.prompts == arithmetic.held_out(1000).prompts
    assert not set(train.prompts) & set(test.prompts)
    assert 0.05 < arithmetic.is_held_out(np.arange(10, 1000)[:, None], np.arange(10, 1000)[None]).mean() < 0.15
    for p, ans, a, b in zip(test.prompts[:50], test.answers[:50], test.a, test.b):
        assert p == f"{a}+{b}=" and int(ans[::-1]) == a + b


def test_exact_match():
    np.testing.assert_array_equal(exact_match(["861", " 861", "86", "8610"], ["861"] * 4), [1, 1, 0, 0])


def test_numeric_match_reads_the_final_number():
    from jaxalign.rewards import last_number, numeric_match

    assert last_number("so 3 + 4 = 7 apples") == 7.0
    assert last_number("work 12 ... #### 1,000") == 1000.0
    assert last_number("\\boxed{-2.5} and 9 later") == -2.5
    assert last_number("no digits") is None
    got = numeric_match(["The answer is 42.", "#### 41", "", "4,2"], ["42", "42", "42", "42"])
    np.testing.assert_array_equal(got, [1, 0, 0, 1])
