"""experiments/wiring.py: every config field reachable, unknown keys refused in one line, config.json."""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from experiments import wiring
from jaxalign.algorithms import onpolicy
from jaxalign.algorithms.rollout import SamplingConfig
from jaxalign.sharding import MeshConfig
from jaxalign.training import OptimConfig

ROOT = Path(__file__).resolve().parents[1]
# The comparison configs (arithmetic, ablation) are checked in test_comparison.py.
CONFIGS = sorted(p.stem for p in (ROOT / "experiments" / "configs").glob("*.py")
                 if p.stem not in ("__init__", "base", "rl_base", "arithmetic", "ablation"))
SECTIONS = {"model": wiring.ModelSection, "data": wiring.DataSection, "optim": OptimConfig, "mesh": MeshConfig,
            "checkpoint": wiring.CheckpointSection, "train": wiring.TrainSection, "task": wiring.TaskSection,
            "reward": wiring.RewardSection, "sampling": SamplingConfig}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_field_of_every_typed_config_is_a_key_of_the_config_files(name):
    config = importlib.import_module(f"experiments.configs.{name}").get_config()
    for key, cls in SECTIONS.items():
        if key in config:
            assert set(config[key].keys()) == _fields(cls), (name, key)
    algo = set(config.algorithm.keys())
    if config.algorithm.name in onpolicy.PRESETS:
        assert algo == _fields(onpolicy.OnPolicyConfig) | {"name"}
    elif config.algorithm.name == "dpo":
        from jaxalign.algorithms.dpo import DPOConfig

        assert algo == _fields(DPOConfig) | {"name", "precompute_reference"}
    # And the resolver accepts the file as it is.
    resolve = wiring.resolve_rl if "task" in config else wiring.resolve_train
    resolve(config)


def _parse(*overrides: str, path: str = "experiments/configs/grpo_arithmetic.py"):
    """The config as the entry scripts parse it (ml_collections reads the overrides from sys.argv)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    argv, saved = ["prog", f"--config={ROOT / path}", *overrides], sys.argv
    sys.argv = argv
    try:
        fv(argv)
    finally:
        sys.argv = saved
    return fv.config


def test_command_line_reaches_algorithm_fields_and_the_preset_follows_the_name():
    cfg = wiring.resolve_rl(_parse("--config.algorithm.clip_eps_high=0.3", "--config.algorithm.beta=0.0",
                                   "--config.sampling.temperature=0.7", "--config.train.nan_policy=stop"))
    grpo = onpolicy.preset("grpo")
    assert cfg["algorithm"] == dataclasses.replace(grpo, clip_eps_high=0.3, beta=0.0, prompts_per_step=32)
    assert cfg["sampling"].temperature == 0.7 and cfg["train"].nan_policy == "stop"
    # Switching the preset takes the new preset's values, not the file's.
    gspo = wiring.resolve_rl(_parse("--config.algorithm.name=gspo"))["algorithm"]
    assert gspo == dataclasses.replace(onpolicy.preset("gspo"), prompts_per_step=32)
    assert (gspo.policy_loss, gspo.clip_eps_low, gspo.clip_eps_high) == ("gspo", 3e-4, 4e-4)


def test_unknown_keys_and_values_are_one_line_errors_naming_the_key():
    with pytest.raises(wiring.ConfigError, match=r"^config\.optim: unknown key 'lerning_rate'; valid keys: b1, b2,"):
        wiring.typed(OptimConfig, {"lr": 1e-3, "lerning_rate": 1e-3}, "optim")
    cfg = _parse()
    with cfg.unlocked():
        cfg.algorithm.clip_eps = 0.1
    with pytest.raises(wiring.ConfigError,
                       match=r"config\.algorithm: unknown key 'clip_eps'; valid keys: .*clip_eps_low"):
        wiring.resolve_rl(cfg)
    with pytest.raises(wiring.ConfigError, match=r"config\.algorithm\.name 'grpoo': valid presets: .*gspo"):
        wiring.resolve_rl(_parse("--config.algorithm.name=grpoo"))


@pytest.mark.parametrize("override, expected", [
    ("--config.optim.lerning_rate=1e-3",
     "error: config.optim: unknown key 'lerning_rate'; valid keys: b1, b2, eps, grad_clip_norm, lr, schedule, "
     "total_steps, warmup_steps, weight_decay"),
    ("--config.algorithm.name=ppo", "error: config.algorithm.name 'ppo': experiments/train.py runs sft, "
     "reward_model, dpo (on-policy algorithms run with experiments/rl.py)"),
])
def test_entry_script_reports_a_config_error_in_one_line(override, expected, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXALIGN_COMPILE_CACHE": "0"}
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "train.py"),
                          f"--config={ROOT / 'experiments/configs/sft_jsonl.py'}", override,
                          f"--config.workdir={tmp_path}"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [expected]
    assert "Traceback" not in out.stderr


def test_data_empty_policy_is_a_config_key(tmp_path):
    from tests._tokenizers import make_char_tokenizer
    from transformers import AutoTokenizer

    make_char_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": ""}\n')
    data = wiring.DataSection(train=str(path), data_dir=str(tmp_path / "tfds"), max_length=8, batch_size=1)
    with pytest.raises(wiring.ConfigError,
                       match=r"sft\.jsonl:2: field 'completion' is empty .*--config\.data\.empty=drop"):
        wiring.build_data(data, "sft", tok, seed=0)
    train, _ = wiring.build_data(dataclasses.replace(data, empty="drop"), "sft", tok, seed=0)
    assert len(train.data.tokens) == 1


def test_write_config_records_the_resolved_sections(tmp_path):
    cfg = wiring.resolve_rl(_parse("--config.algorithm.name=dapo", "--config.algorithm.clip_eps_high=0.3"))
    written = json.loads(Path(wiring.write_config(str(tmp_path), cfg)).read_text())
    assert written["algorithm"]["dynamic_sampling"] is True and written["algorithm"]["clip_eps_high"] == 0.3
    assert written["optim"]["lr"] == 2e-4 and written["sampling"]["max_new_tokens"] == 6
    assert set(written["algorithm"]) == _fields(onpolicy.OnPolicyConfig)


@pytest.mark.parametrize("script, config", [("train.py", "sft_jsonl.py"), ("rl.py", "grpo_arithmetic.py")])
def test_missing_model_path_fails_before_jax_is_imported(script, config):
    """The path check runs before anything slow: the command ends without importing jax (well under a second)."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['{script}', '--config={ROOT / 'experiments/configs' / config}',"
            " '--config.model.path=someorg/somemodel']\n"
            "try:\n"
            f"    runpy.run_path('{ROOT / 'experiments' / script}', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print('jax imported:', 'jax' in sys.modules)\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.splitlines() == [
        "jax imported: False",
        "error: config.model.path 'someorg/somemodel' does not exist on this machine "
        "(jaxalign loads local directories only; it downloads nothing)"]
