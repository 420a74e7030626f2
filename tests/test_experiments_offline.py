"""experiments/train.py end to end at a tiny size: SFT, reward model, DPO from JSONL files."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from ml_collections import config_flags  # noqa: F401 (the config files import ml_collections)

from experiments import train as entry
from jaxalign.rewards.model import NORM_KEY
from experiments.configs import dpo_jsonl, reward_model_jsonl, sft_jsonl
from tests._tokenizers import make_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    rng = np.random.default_rng(0)
    sft, pref = [], []
    for _ in range(48):
        a, b = rng.integers(1, 9, size=2)
        sft.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
        pref.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": "?"})
    make_char_tokenizer(d / "tok")
    return {
        "dir": d,
        "tok": str(d / "tok"),
        "sft": _write_jsonl(d / "sft.jsonl", sft[:40]),
        "sft_test": _write_jsonl(d / "sft_test.jsonl", sft[40:]),
        "pref": _write_jsonl(d / "pref.jsonl", pref[:40]),
    }


def _tiny(cfg, files, workdir, steps):
    cfg.unlock()
    cfg.workdir = str(workdir)
    cfg.model.tokenizer = files["tok"]
    cfg.data.data_dir = str(files["dir"] / "tfds")
    cfg.data.max_length = 16
    cfg.data.batch_size = 8
    cfg.data.buckets = 16
    cfg.train.steps = steps
    cfg.train.log_every = 5
    cfg.train.eval_every = 0
    cfg.checkpoint.every = 10
    cfg.optim.total_steps = steps
    cfg.optim.warmup_steps = 0
    return cfg


def test_sft_learns_and_exports(files, tmp_path):
    cfg = _tiny(sft_jsonl.get_config(), files, tmp_path / "sft", steps=30)
    cfg.data.train, cfg.data.test = files["sft"], files["sft_test"]
    cfg.optim.lr = 3e-3
    out = entry.run(cfg)
    rows = out["rows"]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert "eval/loss" in rows[-1]
    lines = (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(rows)
    assert (tmp_path / "sft" / "checkpoints").is_dir()
    assert list((tmp_path / "sft" / "plots").glob("*.png"))
    # The export is a normal Hugging Face checkpoint.
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "sft" / "export")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "sft" / "export"))
    ids = tok("3+4=")["input_ids"]
    with torch.no_grad():
        assert hf(input_ids=torch.tensor([ids])).logits.shape[-1] == len(tok)


def test_reward_model_ranks_pairs_and_saves_statistics(files, tmp_path):
    cfg = _tiny(reward_model_jsonl.get_config(), files, tmp_path / "rm", steps=30)
    cfg.data.train = files["pref"]
    cfg.optim.lr = 3e-3
    cfg.train.log_every = 1  # the first row is step 1's loss: at lr 3e-3 it has converged by step 5
    rows = entry.run(cfg)["rows"]
    assert rows[0]["step"] == 1
    assert rows[-1]["accuracy"] > 0.8 and rows[-1]["loss"] < 0.1 * rows[0]["loss"]
    config = json.loads((tmp_path / "rm" / "export" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    stats = config[NORM_KEY]
    assert stats["count"] == 80 and stats["std"] > 0


@pytest.mark.parametrize("precompute", [True, False])
def test_dpo_improves_its_objective(files, tmp_path, precompute):
    cfg = _tiny(dpo_jsonl.get_config(), files, tmp_path / "dpo", steps=20)
    cfg.data.train = files["pref"]
    cfg.algorithm.precompute_reference = precompute
    cfg.optim.lr = 1e-3
    cfg.train.log_every = 1
    rows = entry.run(cfg)["rows"]
    assert rows[0]["step"] == 1
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference at step 1
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert rows[-1]["reward_accuracy"] > 0.7


def test_command_line_overrides(files, tmp_path):
    """The script itself, with --config.* overrides, as a user runs it."""
    cmd = [sys.executable, str(ROOT / "experiments" / "train.py"),
           f"--config={ROOT / 'experiments' / 'configs' / 'sft_jsonl.py'}",
           f"--config.workdir={tmp_path / 'cli'}", f"--config.model.tokenizer={files['tok']}",
           f"--config.data.train={files['sft']}", f"--config.data.data_dir={files['dir'] / 'tfds'}",
           "--config.data.max_length=16", "--config.train.steps=3", "--config.train.log_every=1",
           "--config.checkpoint.every=2"]
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=300, capture_output=True)
    rows = [json.loads(x) for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
