"""experiments/comparison_stages.py's stages: held-out reward-model pairs and the likelihood reward model."""

import numpy as np
import pytest
from flax import nnx

from experiments import comparison_stages as comparison
from jaxalign import data, models
from jaxalign.rewards.base import Rollout
from jaxalign.tasks import arithmetic


def _pairs(groups):
    """Preference pairs, `groups[k]` of them for prompt k, in order."""
    tok = arithmetic.load_tokenizer()
    records = [{"prompt": arithmetic.prompt(10 + k, 20), "chosen": arithmetic.answer(10 + k, 20), "rejected": str(j)}
               for k, n in enumerate(groups) for j in range(n)]
    return data.tokenize_preference(records, tok, max_length=16)


def _prompts(pairs):
    return {tuple(c[:n]) for c, n in zip(pairs.chosen, pairs.prompt_lengths)}


def test_held_out_pairs_start_at_a_prompt_boundary():
    pairs = _pairs([2, 3, 1])
    train, held = comparison._split_pairs(pairs, 2)  # the cut falls inside prompt 1: it moves to its first pair
    assert (len(train), len(held)) == (2, 4)
    assert not _prompts(train) & _prompts(held) and len(_prompts(held)) == 2
    assert list(held.index) == [2, 3, 4, 5] and [len(r) for r in held.rejected] == [len(r) for r in pairs.rejected[2:]]
    with pytest.raises(ValueError, match=r"reward_model.heldout_pairs = 6 must be in \(0, 6\)"):
        comparison._split_pairs(pairs, 6)
    with pytest.raises(ValueError, match="every labelled pair shares one prompt"):
        comparison._split_pairs(_pairs([4]), 1)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_likelihood_reward_is_the_completions_log_probability():
    model = models.Transformer(models.tiny_config("llama", vocab_size=14, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                                  head_dim=16), rngs=nnx.Rngs(0))
    # Two rows: prompts of 3 and 5 tokens left-padded to 5, completions of 2 and 4 tokens right-padded to 4.
    prompts, completions = [[4, 5, 12], [2, 3, 7, 12, 9]], [[6, 1], [3, 3, 8, 1]]
    width = 4
    tokens = np.zeros((2, 5 + width), np.int32)
    mask = np.zeros_like(tokens)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        tokens[r, 5 - len(p):5], tokens[r, 5:5 + len(c)] = p, c
        mask[r, 5 - len(p):5 + len(c)] = 1
    rollout = Rollout(["", ""], ["", ""], ["", ""], tokens, mask, np.array([2, 4]), np.array([False, False]))
    rm = comparison.LikelihoodRewardModel(model, {"mean": 0.5, "std": 2.0}, completion_width=width)
    # Reference: each row's unpadded sequence on its own; float64 log-softmax; the completion's tokens summed.
    want = []
    for p, c in zip(prompts, completions):
        seq = np.array([p + c], np.int32)
        logp = _log_softmax(model(seq))[0]
        want.append(sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(c)))
    np.testing.assert_allclose(rm(rollout), (np.array(want) - 0.5) / 2.0, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="leave no prompt"):
        comparison.LikelihoodRewardModel(model, {"mean": 0.0, "std": 1.0}, completion_width=9)(rollout)
