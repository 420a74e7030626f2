"""The loader: deterministic shuffling, exact resume, per-process shards, shapes."""

import itertools
import json

import numpy as np
import pytest

from jaxalign import data
from jaxalign.data import batching
from tests._tokenizers import make_char_tokenizer


def sft_data(n=23, max_length=20, seed=0):
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(3, 90, size=rng.integers(3, max_length + 1)).astype(np.int32) for _ in range(n)]
    prompts = np.array([rng.integers(1, len(t)) for t in tokens], np.int32)
    return data.SFTData(tokens, prompts, np.arange(100, 100 + n), max_length, 0, {})


def take(loader, k):
    return list(itertools.islice(loader, k))


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batches_other_seed_other_order():
    a = take(data.Loader(sft_data(), batch_size=4, seed=3), 12)
    b = take(data.Loader(sft_data(), batch_size=4, seed=3), 12)
    c = take(data.Loader(sft_data(), batch_size=4, seed=4), 12)
    assert all(same(x, y) for x, y in zip(a, b))
    assert [x["index"].tolist() for x in a] != [x["index"].tolist() for x in c]


def test_epochs_are_different_permutations_with_remainder_dropped():
    loader = data.Loader(sft_data(n=23), batch_size=4, seed=0)
    assert loader.steps_in_epoch(0) == 5  # 23 // 4; 3 samples dropped per epoch
    epochs = [np.concatenate([b["index"] for b in take(loader, 5)]) for _ in range(3)]
    for e, seen in enumerate(epochs):
        assert len(set(seen.tolist())) == 20
        assert seen.tolist() == (100 + loader.order(e)[:20]).tolist()
        assert sorted(loader.order(e).tolist()) == list(range(23))
    assert epochs[0].tolist() != epochs[1].tolist()
    assert loader.epoch == 2 and loader.step == 5


def test_unshuffled_epoch_is_the_source_order_and_num_epochs_stops():
    batches = list(data.Loader(sft_data(n=8), batch_size=4, shuffle=False, num_epochs=2))
    assert [b["index"].tolist() for b in batches] == [[100, 101, 102, 103], [104, 105, 106, 107]] * 2


@pytest.mark.parametrize("pack_length", [None, 32])
def test_resume_from_state_is_exact(pack_length):
    kw = {"batch_size": 4, "seed": 7, "pack_length": pack_length}
    if pack_length is None:
        kw["buckets"] = 8
    full = take(data.Loader(sft_data(), **kw), 20)  # crosses several epoch ends
    for k in (0, 3, 5, 11):
        first = data.Loader(sft_data(), **kw)
        take(first, k)
        state = json.loads(json.dumps(first.get_state()))  # survives a JSON checkpoint
        resumed = data.Loader(sft_data(), **kw)
        resumed.set_state(state)
        rest = take(resumed, 20 - k)
        assert len(rest) == 20 - k
        assert all(same(x, y) for x, y in zip(rest, full[k:]))


def test_state_from_another_configuration_is_refused():
    state = data.Loader(sft_data(), batch_size=4, seed=1).get_state()
    with pytest.raises(ValueError, match="seed"):
        data.Loader(sft_data(), batch_size=4, seed=2).set_state(state)
    with pytest.raises(ValueError, match="batch_size"):
        data.Loader(sft_data(), batch_size=2, seed=1).set_state(state)


@pytest.mark.parametrize("shard_count", [2, 4])
def test_shards_are_disjoint_cover_the_global_batch_and_agree_on_shapes(shard_count):
    kw = {"batch_size": 8, "seed": 5, "buckets": 4}
    whole = take(data.Loader(sft_data(n=40), **kw), 10)
    shards = [take(data.Loader(sft_data(n=40), shard_index=s, shard_count=shard_count, **kw), 10)
              for s in range(shard_count)]
    for step, glob in enumerate(whole):
        parts = [shards[s][step] for s in range(shard_count)]
        assert {p["tokens"].shape for p in parts} == {(8 // shard_count, glob["tokens"].shape[1])}
        for key in glob:
            assert np.array_equal(np.concatenate([p[key] for p in parts]), glob[key])
    for epoch_steps in (range(0, 5), range(5, 10)):  # 40 // 8 = 5 steps per epoch
        per_shard = [set(np.concatenate([shards[s][t]["index"] for t in epoch_steps]).tolist())
                     for s in range(shard_count)]
        assert sum(len(p) for p in per_shard) == 40
        assert set().union(*per_shard) == set(range(100, 140))


def test_bucketing_bounds_the_shapes():
    buckets = data.power_of_two_buckets(4, 20)
    loader = data.Loader(sft_data(n=50), batch_size=2, seed=0, buckets=buckets)
    shapes = {b["tokens"].shape for b in take(loader, 200)}
    assert {s[1] for s in shapes} <= set(buckets) and len(shapes) > 1
    fixed = data.Loader(sft_data(n=50), batch_size=2, seed=0)
    assert {b["tokens"].shape for b in take(fixed, 50)} == {(2, 20)}


def test_packed_epoch_visits_every_sample_once():
    d = sft_data(n=30)
    loader = data.Loader(d, batch_size=3, seed=2, pack_length=40)
    steps = loader.steps_in_epoch(0)
    batches = take(loader, steps)
    assert loader.step == steps and loader.epoch == 0
    assert {b["tokens"].shape for b in batches} == {(3, 40)}
    total = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert total == sum(len(t) for t in d.tokens)
    got = sorted(np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches]).tolist())
    assert got == sorted(np.concatenate(d.tokens).tolist())
    assert steps < 30 // 3  # packing needs fewer steps than one sample per row


def test_loader_rejects_bad_settings():
    with pytest.raises(ValueError, match="multiple of shard_count"):
        data.Loader(sft_data(), batch_size=6, shard_count=4)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        data.Loader(sft_data(n=3), batch_size=4)
    with pytest.raises(ValueError, match="pack_length"):
        data.Loader(sft_data(), batch_size=4, pack_length=10)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_char_tokenizer(tmp_path_factory.mktemp("tok"))


def test_end_to_end_prompts_from_tfds(tmp_path, tok):
    rows = [{"prompt": "x" * (i % 5 + 1) + "?", "answer": str(i)} for i in range(10)]
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = data.prepare("prompt_answer", path, data_dir=tmp_path / "tfds")["train"]
    prompts = data.tokenize_prompts(source, tok, max_length=16)
    loader = data.Loader(prompts, batch_size=4, seed=0, buckets=8)
    for batch in take(loader, 5):
        assert batch["prompt_tokens"].shape == (4, 8)
        assert (batch["prompt_mask"][:, -1] == 1).all()  # left padded: prompts end together
        for row, i in enumerate(batch["index"]):
            assert batch["answers"][row] == rows[i]["answer"]
            real = batch["prompt_tokens"][row][batch["prompt_mask"][row] == 1].tolist()
            assert real == [tok.bos_token_id] + tok(rows[i]["prompt"], add_special_tokens=False)["input_ids"]


def test_end_to_end_preference_from_tfds(tmp_path, tok):
    rows = [{"prompt": f"q{i}:", "chosen": "y" * (i % 4 + 1), "rejected": "n" * (i % 7 + 1)} for i in range(9)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = data.prepare("preference", path, data_dir=tmp_path / "tfds")["train"]
    pairs = data.tokenize_preference(source, tok, max_length=32)
    batch = next(data.Loader(pairs, batch_size=3, seed=1, buckets=4))
    assert batch["chosen_tokens"].shape == batch["rejected_tokens"].shape
    assert batch["chosen_tokens"].shape[1] % 4 == 0
    for row, i in enumerate(batch["index"]):
        text = tok.decode(batch["rejected_tokens"][row][batch["rejected_loss_mask"][row] == 1].tolist())
        assert text == rows[i]["rejected"] + "</s>"


def pair_data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(8, 13, size=n).astype(np.int32)
    chosen = [rng.integers(3, 90, size=p + rng.integers(1, 6)).astype(np.int32) for p in prompts]
    rejected = [rng.integers(3, 90, size=p + rng.integers(1, 6)).astype(np.int32) for p in prompts]
    return data.PreferenceData(chosen, rejected, prompts, np.arange(n), 20, 0, {})


@pytest.mark.parametrize("side", ["right", "left"])
def test_every_shard_gets_the_score_width_of_the_global_batch(side):
    kw = {"batch_size": 8, "seed": 3, "padding_side": side}
    whole = take(data.Loader(pair_data(), **kw), 6)
    shards = [take(data.Loader(pair_data(), shard_index=s, shard_count=4, **kw), 6) for s in range(4)]
    widths = set()
    for step, glob in enumerate(whole):
        # The width of one process's collate of the whole batch, from its masks, is the reference.
        masks = np.concatenate([glob["chosen_loss_mask"], glob["rejected_loss_mask"]])
        want = batching.score_width(batching.first_scored_columns(masks), masks.shape[1])
        assert {shards[s][step]["score_width"] for s in range(4)} == {glob["score_width"]} == {want}
        for name in ("chosen", "rejected"):
            mask = glob[f"{name}_loss_mask"]
            assert mask[:, -glob["score_width"]:].sum() == mask.sum()
        widths.add(glob["score_width"])
    assert max(widths) < 19  # the prompt's columns are really left out
