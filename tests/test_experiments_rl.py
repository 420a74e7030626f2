"""experiments/rl.py end to end at a tiny size: every on-policy config, and GSM8K through TFDS."""

import json

import pytest
import tensorflow_datasets as tfds
import transformers

from experiments import rl
from experiments.configs import dapo_arithmetic, dapo_gsm8k, dr_grpo_arithmetic, grpo_arithmetic, ppo_arithmetic
from jaxalign.tasks import arithmetic
from tests._tokenizers import make_char_tokenizer


def _tiny(cfg, workdir, tokenizer):
    cfg.unlock()
    cfg.workdir = str(workdir)
    cfg.model.path = ""  # a tiny random model instead of the demo's SFT checkpoint
    cfg.model.tokenizer = str(tokenizer)
    cfg.task.update(dict(train_prompts=64, eval_prompts=16, eval_batch_size=16))
    cfg.algorithm.update(dict(prompts_per_step=8, group_size=2))  # rows split over 8 devices
    cfg.sampling.max_new_tokens = 4
    cfg.train.update(dict(steps=3, log_every=1, eval_every=0))
    cfg.checkpoint.every = 2
    return cfg


@pytest.mark.parametrize("config", [grpo_arithmetic, dr_grpo_arithmetic, dapo_arithmetic, ppo_arithmetic],
                         ids=["grpo", "dr_grpo", "dapo", "ppo"])
def test_rl_configs_run_on_the_builtin_task(config, tmp_path):
    cfg = _tiny(config.get_config(), tmp_path, arithmetic.TOKENIZER_DIR)
    rows = rl.run(cfg)["rows"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all("reward_mean" in r for r in rows) and "eval/greedy_reward" in rows[-1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"]
    transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))


def test_dapo_on_gsm8k_through_tfds(tmp_path):
    records = [{"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}=<<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}"}
               for i in range(1, 9)]

    def as_data_source(self, split, *args, **kwargs):
        return records

    tok = make_char_tokenizer(tmp_path / "tok")
    cfg = _tiny(dapo_gsm8k.get_config(), tmp_path / "run", tmp_path / "tok")
    cfg.model.dtype = "float32"
    cfg.task.update(dict(max_prompt_length=32, prompt_buckets=32))
    with tfds.testing.mock_data(as_data_source_fn=as_data_source, policy=tfds.testing.MockPolicy.USE_CODE):
        rows = rl.run(cfg)["rows"]
    assert len(rows) == 3 and rows[-1]["eval/greedy_reward"] >= 0.0
    assert cfg.reward.verifier == "numeric_match" and len(tok) < 128


def test_train_section_reaches_the_step(tmp_path):
    """`train.micro_batches` and `train.nan_policy` were once ignored by rl.py; both now change what runs."""
    from jaxalign.training import NonFiniteError

    cfg = _tiny(grpo_arithmetic.get_config(), tmp_path / "micro", arithmetic.TOKENIZER_DIR)
    cfg.train.micro_batches = 3  # 16 rows do not split into 3
    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        rl.run(cfg)
    cfg = _tiny(grpo_arithmetic.get_config(), tmp_path / "nan", arithmetic.TOKENIZER_DIR)
    cfg.train.nan_policy, cfg.optim.lr = "stop", 1e30
    with pytest.raises(NonFiniteError):
        rl.run(cfg)
    written = json.loads((tmp_path / "nan" / "config.json").read_text())
    assert written["train"]["nan_policy"] == "stop" and written["optim"]["lr"] == 1e30
    cfg = _tiny(grpo_arithmetic.get_config(), tmp_path / "skips", arithmetic.TOKENIZER_DIR)
    cfg.optim.lr, cfg.train.max_skipped_fraction = 1e30, 0.5  # nan_policy "skip": too many skips end the run
    with pytest.raises(NonFiniteError, match="max_skipped_fraction"):
        rl.run(cfg)
