"""The "say it in few words" task: prompts, the rule, and its wiring into experiments/rl.py."""

import json

import numpy as np
import pytest

from jaxalign.rewards import Rollout
from jaxalign.tasks import instruct


def _rollout(completions, answers, truncated):
    n = len(completions)
    return Rollout([""] * n, completions, answers, np.zeros((n, 1)), np.zeros((n, 1)), np.ones(n),
                   np.asarray(truncated))


def test_records_are_deterministic_and_held_out_topics_are_unseen():
    a, b = instruct.train_records(50, seed=3), instruct.train_records(50, seed=3)
    assert a == b and a != instruct.train_records(50, seed=4)
    assert set(instruct.TRAIN_TOPICS).isdisjoint(instruct.TEST_TOPICS)
    for r in instruct.held_out(30):
        spec = json.loads(r["answer"])
        assert spec["keyword"] in instruct.TEST_TOPICS
        assert instruct.MIN_WORDS <= spec["max_words"] <= instruct.MAX_WORDS
        assert f"at most {spec['max_words']} words" in r["prompt"] and spec["keyword"] in r["prompt"]


@pytest.mark.parametrize("text, truncated, expected", [
    ("The ocean is vast and deep.", False, {"short": True, "on_topic": True, "finished": True}),
    ("Oceans cover most of Earth.", False, {"short": True, "on_topic": True, "finished": True}),  # case, plural
    ("It is vast and deep and blue and cold and old.", False, {"short": False, "on_topic": False, "finished": True}),
    ("ocean", False, {"short": False, "on_topic": True, "finished": True}),  # one word is below the floor
    ("The ocean is vast.", True, {"short": True, "on_topic": True, "finished": False}),
])
def test_check_by_hand(text, truncated, expected):
    answer = json.dumps({"max_words": 8, "keyword": "ocean"})
    assert instruct.check(text, answer, truncated) == expected


def test_reward_is_one_only_when_every_part_holds():
    answer = json.dumps({"max_words": 5, "keyword": "tea"})
    texts = ["Tea is a warm drink.", "Tea is a warm drink people love.", "Coffee is a drink.", "Tea is warm."]
    r = instruct.follows_constraints(_rollout(texts, [answer] * 4, [False, False, False, True]))
    np.testing.assert_array_equal(r, [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(instruct.word_counts(texts), [5, 7, 4, 3])


def test_rl_config_for_smollm2_runs_the_task_with_a_tiny_model(tmp_path):
    from experiments import rl, wiring
    from experiments.configs import smollm2
    from tests._tokenizers import make_char_tokenizer

    make_char_tokenizer(tmp_path / "tok", chat_template=True)
    cfg = smollm2.get_config("grpo")
    assert cfg.model.path == "smollm2" and cfg.reward.verifier == "instruct"
    cfg.unlock()
    cfg.workdir = str(tmp_path / "run")
    cfg.model.path, cfg.model.tokenizer = "", str(tmp_path / "tok")
    cfg.model.overrides.max_position_embeddings = 512
    cfg.task.update(dict(train_prompts=32, eval_prompts=8, eval_batch_size=8, max_prompt_length=128))
    cfg.algorithm.update(dict(prompts_per_step=8, group_size=2))
    cfg.sampling.max_new_tokens = 4
    cfg.train.update(dict(steps=1, eval_every=0))
    rows = rl.run(cfg)["rows"]
    # A random model's 4-character replies never name the topic: every reward is 0, and said so.
    assert rows[-1]["reward_mean"] == 0.0 and rows[-1]["eval/greedy_reward"] == 0.0
    reward = wiring.build_reward(wiring.typed(wiring.RewardSection, cfg.reward, "reward"))
    answer = json.dumps({"max_words": 6, "keyword": "kite"})
    np.testing.assert_array_equal(reward(_rollout(["A kite flies.", "A kite flies."], [answer] * 2, [False, True])),
                                  [1.0, 0.0])  # reads truncation from the rollout, not just the text


def test_model_path_smollm2_resolves_to_the_converted_gguf(tmp_path, monkeypatch):
    from experiments.wiring import resolve_model_path
    from jaxalign.models import gguf

    monkeypatch.setenv("JAXALIGN_CACHE", str(tmp_path))
    path = resolve_model_path("smollm2")
    assert path == str(tmp_path / "gguf" / gguf.smollm2_path().stem)
    cfg = json.loads((tmp_path / "gguf" / gguf.smollm2_path().stem / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert resolve_model_path(str(gguf.smollm2_path())) == path  # a .gguf path: the same cache
    assert resolve_model_path("/some/hf/dir") == "/some/hf/dir"
