"""Padding, bucketing and packing: exact arrays and packed == unpacked."""

import numpy as np
import pytest

from jaxalign import data
from jaxalign.data import batching


def seq(*values):
    return np.array(values, np.int32)


def test_right_padding_arrays():
    batch = data.collate_sequences([seq(5, 6, 7, 8), seq(9, 10)], [2, 1], length=6, pad_id=0)
    assert batch["tokens"].tolist() == [[5, 6, 7, 8, 0, 0], [9, 10, 0, 0, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert batch["segment_ids"].tolist() == batch["attention_mask"].tolist()
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 0, 0], [0, 1, 0, 0, 0, 0]]
    assert all(v.dtype == np.int32 and v.shape == (2, 6) for v in batch.values())


def test_left_padding_for_prompts():
    batch = data.collate_prompts([seq(5, 6, 7), seq(9)], length=4, pad_id=1)
    assert batch["prompt_tokens"].tolist() == [[1, 5, 6, 7], [1, 1, 1, 9]]
    assert batch["prompt_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["prompt_positions"].tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]


def test_left_padded_training_batch_keeps_masks_aligned():
    batch = data.collate_sequences([seq(5, 6, 7)], [1], length=5, pad_id=0, side="left")
    assert batch["tokens"].tolist() == [[0, 0, 5, 6, 7]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1]]
    assert batch["positions"].tolist() == [[0, 0, 0, 1, 2]]


def test_pad_rejects_bad_input():
    with pytest.raises(ValueError, match="side"):
        data.pad([seq(1)], 2, pad_id=0, side="middle")
    with pytest.raises(ValueError, match="does not fit"):
        data.pad([seq(1, 2, 3)], 2, pad_id=0)


def test_bucket_lengths():
    assert data.bucket_length(5, max_length=100) == 100
    assert [data.bucket_length(n, max_length=100, buckets=16) for n in (1, 16, 17, 99)] == [16, 16, 32, 100]
    pow2 = data.power_of_two_buckets(16, 100)
    assert pow2 == (16, 32, 64, 100)
    assert [data.bucket_length(n, max_length=100, buckets=pow2) for n in (3, 33, 65)] == [16, 64, 100]
    with pytest.raises(ValueError, match="must reach max_length"):
        data.bucket_length(3, max_length=100, buckets=(16, 32))
    with pytest.raises(ValueError, match="> max_length"):
        data.bucket_length(101, max_length=100, buckets=16)


def random_sequences(rng, n, max_len):
    seqs = [rng.integers(3, 50, size=rng.integers(2, max_len + 1)).astype(np.int32) for _ in range(n)]
    prompts = [int(rng.integers(0, len(s))) for s in seqs]
    return seqs, prompts


def test_plan_packing_places_each_sample_once_within_capacity():
    rng = np.random.default_rng(0)
    seqs, _ = random_sequences(rng, 60, 12)
    lengths = np.array([len(s) for s in seqs])
    order = rng.permutation(60)
    plan = data.plan_packing(lengths, order, rows=3, length=16)
    placed = [i for batch in plan for row in batch for i in row]
    assert sorted(placed) == list(range(60))
    assert all(len(batch) == 3 for batch in plan)
    assert all(lengths[row].sum() <= 16 for batch in plan for row in batch if row)
    # Within a batch, samples keep the epoch order across the row-major walk of first fit.
    firsts = [min(order.tolist().index(i) for row in batch for i in row) for batch in plan]
    assert firsts == sorted(firsts)
    with pytest.raises(ValueError, match="packed length"):
        data.plan_packing(lengths, order, rows=3, length=4)


def test_packed_rows_equal_the_unpacked_sequences():
    rng = np.random.default_rng(1)
    seqs, prompts = random_sequences(rng, 40, 10)
    lengths = np.array([len(s) for s in seqs])
    plan = data.plan_packing(lengths, np.arange(40), rows=4, length=24)
    seen = 0
    for rows in plan:
        packed = data.pack_rows(rows, seqs, prompts, length=24, pad_id=0)
        assert all(v.shape == (4, 24) and v.dtype == np.int32 for v in packed.values())
        for r, members in enumerate(rows):
            unpacked = data.collate_sequences([seqs[i] for i in members], [prompts[i] for i in members],
                                              length=24, pad_id=0)
            ids = packed["segment_ids"][r]
            used = int(lengths[members].sum()) if members else 0
            assert (ids[used:] == 0).all() and (packed["tokens"][r, used:] == 0).all()
            assert packed["attention_mask"][r].tolist() == (ids > 0).astype(int).tolist()
            for k, i in enumerate(members, start=1):
                where = ids == k
                assert where.sum() == len(seqs[i])
                assert np.flatnonzero(where).tolist() == list(range(where.argmax(), where.argmax() + len(seqs[i])))
                n = len(seqs[i])
                for key in ("tokens", "loss_mask", "positions"):
                    assert packed[key][r][where].tolist() == unpacked[key][k - 1, :n].tolist(), key
                assert packed["positions"][r][where].tolist() == list(range(n))
                assert packed["loss_mask"][r][where][0] == 0
                seen += 1
    assert seen == 40


def test_score_width_rounds_up_to_a_quarter_of_the_length_and_leaves_token_zero_out():
    assert batching.score_width([64, 70], 128) == 64  # 128 - 64, already a multiple of 32
    assert batching.score_width([65, 90], 128) == 64
    assert batching.score_width([63], 128) == 96  # 65 columns round up to 96
    assert batching.score_width([1], 128) == 127  # everything but token 0
    assert batching.score_width([5], 10) == 6  # multiple of ceil(10 / 4) = 3
    assert batching.score_width([], 10) == 1
    assert {batching.score_width([c], 100) for c in range(1, 100)} == {25, 50, 75, 99}


@pytest.mark.parametrize("side", ["right", "left"])
def test_collated_pairs_score_every_response_token_in_the_last_score_width_columns(side):
    rng = np.random.default_rng(0)
    prompts = [9, 12, 10]
    chosen = [rng.integers(1, 50, size=p + n).astype(np.int32) for p, n in zip(prompts, (4, 2, 6))]
    rejected = [rng.integers(1, 50, size=p + n).astype(np.int32) for p, n in zip(prompts, (1, 5, 3))]
    out = batching.collate_preference(chosen, rejected, prompts, length=20, pad_id=0, side=side)
    width = out["score_width"]
    assert isinstance(width, int) and width < 19
    for name in ("chosen", "rejected"):
        mask = out[f"{name}_loss_mask"]
        assert mask[:, :-width].sum() == 0 and mask[:, -width:].sum() == mask.sum() > 0
    # The narrowest window that holds them all, rounded up to a multiple of 20 / 4.
    first = min(int(np.argmax(r)) for n in ("chosen", "rejected") for r in out[f"{n}_loss_mask"])
    assert width == -(-(20 - first) // 5) * 5
