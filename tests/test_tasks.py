"""The built-in arithmetic task: tokenizer asset, answers, held-out split, verifier."""

import filecmp

import numpy as np
import pytest

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


def test_numbers_are_zero_padded_and_reversed():
    assert arithmetic.prompt(123, 45) == "321+540=" and arithmetic.answer(123, 45) == "8610"
    assert arithmetic.prompt(10, 999) == "010+999=" and arithmetic.answer(999, 999) == "8991"
    assert arithmetic.answer(10, 10) == "0200" and arithmetic.read("0200") == 20
    assert arithmetic.max_answer_len() == 5 and arithmetic.max_prompt_len() == 8
    with pytest.raises(ValueError, match="does not fit in 3 digits"):
        arithmetic.write(1000, 3)


def test_answer_digit_depends_on_operand_digits_at_fixed_offsets():
    """Digit i of the answer is (a_i + b_i + carry) mod 10 with a_i at prompt position i and b_i at 4 + i,
    i.e. 7 and 3 tokens before the token that predicts it (position 7 + i): the alignment the format exists for."""
    problems = arithmetic.sample_problems(np.random.default_rng(1), 300)
    for p, ans in zip(problems.prompts, problems.answers):
        seq, carry = p + ans, 0
        assert len(p) == 8 and len(ans) == 4
        for i in range(4):
            x = int(seq[7 + i - 7]) if i < 3 else 0
            y = int(seq[7 + i - 3]) if i < 3 else 0
            assert int(seq[8 + i]) == (x + y + carry) % 10, (p, ans, i)
            carry = (x + y + carry) // 10


def test_mixed_demonstrations_are_half_task_half_sparse_digits():
    rng = np.random.default_rng(0)
    p = arithmetic.sample_problems(rng, 20000, digits="mixed")
    digits = np.stack([p.a // 10**i % 10 for i in range(3)])  # [3, n]
    # Half from the task (10-999: the units digit is 0 w.p. 99/990, the tens and hundreds w.p. 90/990), half
    # with every digit 0 w.p. 1/2 + 1/2 * 1/10 = 0.55 (the held-out split's filter moves these by ~0.01).
    np.testing.assert_allclose((digits == 0).mean(1), 0.5 * 0.55 + 0.5 * np.array([99, 90, 90]) / 990, atol=0.02)
    # Both operands of a problem come from the same half: where a < 10 (only the sparse half writes that), b's
    # hundreds digit is 0 w.p. 0.55, not the mixture's 0.32.
    assert abs((p.b[p.a < 10] < 100).mean() - 0.55) < 0.05
    assert p.a.min() == 0 and max(p.a.max(), p.b.max()) <= 999
    assert not arithmetic.is_held_out(p.a, p.b).any()
    assert all(arithmetic.read(ans) == a + b for ans, a, b in zip(p.answers[:2000], p.a, p.b))
    with pytest.raises(ValueError, match="digits must be"):
        arithmetic.sample_problems(rng, 1, digits="uniform")


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
        assert p == f"{a:03d}"[::-1] + "+" + f"{b:03d}"[::-1] + "=" and int(ans[::-1]) == a + b


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
