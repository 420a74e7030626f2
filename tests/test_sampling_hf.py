"""Greedy decoding token for token against transformers' `generate` (torch) on the same weights."""

import jax
import numpy as np
import pytest
import torch

from jaxalign.models import load_hf
from jaxalign.sampling import generate
from tests._hf_models import build_hf_lm
from tests.test_sampling import LENGTHS, MAX_NEW, left_padded_prompts

PAD, EOS = 0, 2  # the tiny models' pad_token_id and eos_token_id


def hf_greedy(hf_model, tokens, mask, eos_id: int) -> np.ndarray:
    """transformers' greedy continuation `[B, <= MAX_NEW]` (pad after EOS, as ours)."""
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                                attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                                max_new_tokens=MAX_NEW, pad_token_id=PAD, eos_token_id=eos_id)
    return out[:, tokens.shape[1]:].numpy()


def eos_stopping_some_rows(free_run: np.ndarray) -> int:
    """A token to use as EOS so that some rows stop mid-way and the rest run long.

    A random model rarely emits its configured EOS. Greedy rows are
    deterministic, so with EOS = e each row follows `free_run` up to the first e:
    pick the e that keeps the most tokens to compare while stopping >= 1 row.
    """
    def lengths(e):
        return [int(np.argmax(row == e)) + 1 if (row == e).any() else len(row) for row in free_run]

    candidates = [int(e) for e in np.unique(free_run) if min(lengths(e)) < free_run.shape[1]]
    return max(candidates, key=lambda e: sum(lengths(e)))


@pytest.mark.parametrize("variant", ["llama", "gpt2", "gemma2"])
def test_greedy_equals_transformers(variant, tmp_path):
    hf_model = build_hf_lm(variant, tmp_path, seed=11)
    model, cfg = load_hf(tmp_path)
    tokens, mask = left_padded_prompts(cfg.vocab_size, LENGTHS, seed=2)
    eos_id = eos_stopping_some_rows(hf_greedy(hf_model, tokens, mask, EOS))
    ref = hf_greedy(hf_model, tokens, mask, eos_id)
    ours = generate(model, tokens, mask, max_new_tokens=MAX_NEW, rng=jax.random.key(0), greedy=True,
                    eos_ids=(eos_id,), pad_id=PAD)
    completions, lengths = np.asarray(ours.completions), np.asarray(ours.lengths)
    assert lengths.min() < MAX_NEW, "no row stopped at EOS: the test would not check stopping"
    for row in range(len(tokens)):
        # transformers pads finished rows and stops once all are done; compare
        # each row up to and including its EOS.
        np.testing.assert_array_equal(completions[row, :lengths[row]], ref[row, :lengths[row]],
                                      err_msg=f"{variant} row {row}")
        assert (ref[row, lengths[row]:] == PAD).all()
    assert ref.shape[1] == lengths.max()
    print(variant, "lengths", lengths.tolist(), "eos", eos_id)
