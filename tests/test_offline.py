"""Local files only: nothing in a run reaches the network, and a missing path fails at once, named."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxalign import data, models
from jaxalign.host import OFFLINE_ENV, resolve_local_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection raises and is recorded."""
    tried = []

    def refuse(self, address, *a, **k):
        tried.append(address)
        raise OSError(f"network access in a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return tried


def test_importing_jaxalign_forces_offline_mode():
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "PYTHONPATH": REPO}
    code = ("import jaxalign, os, huggingface_hub.constants as c; "
            "print([os.environ[k] for k in %r], c.HF_HUB_OFFLINE)" % sorted(OFFLINE_ENV))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['1', '1', '1'] True"


@pytest.mark.parametrize("path", ["someorg/somemodel", "/data/does_not_exist"])
def test_missing_model_path_fails_at_once_naming_it(no_network, path):
    cfg = models.tiny_config()
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=f"model path '{path}' does not exist on this machine"):
        models.load_hf(path)
    with pytest.raises(FileNotFoundError, match=f"tokenizer path '{path}' does not exist"):
        models.check_tokenizer(path, cfg)
    assert time.perf_counter() - t < 1.0 and no_network == []


def test_entry_script_path_check_names_the_key(tmp_path):
    from ml_collections import ConfigDict

    from experiments.cli import check_model_paths

    check_model_paths(ConfigDict({"model": {"path": "", "tokenizer": str(tmp_path)}}))  # both fine
    with pytest.raises(SystemExit, match="config.model.path 'someorg/somemodel' does not exist"):
        check_model_paths(ConfigDict({"model": {"path": "someorg/somemodel", "tokenizer": ""}}))
    assert resolve_local_path(str(tmp_path)) == tmp_path


def test_absl_info_is_off_unless_verbosity_is_given():
    from absl import logging

    from experiments.cli import quiet_absl

    before = logging.get_verbosity()
    try:
        logging.set_verbosity(logging.INFO)
        quiet_absl(verbosity_given=True)
        assert logging.get_verbosity() == logging.INFO
        quiet_absl(verbosity_given=False)
        assert logging.get_verbosity() == logging.WARNING
    finally:
        logging.set_verbosity(before)


def test_local_data_build_is_quiet_offline_and_leaves_nothing_when_it_fails(no_network, tmp_path, capfd):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    bad.write_text('{"prompt": "a", "completion": ""}\n')
    out_dir = tmp_path / "tfds"
    sources = data.prepare("sft", str(good), data_dir=out_dir)
    assert len(sources["train"]) == 2
    built = sorted(os.listdir(out_dir / "jaxalign_sft"))
    with pytest.raises(data.DataError, match="bad.jsonl:1"):
        data.prepare("sft", str(bad), data_dir=out_dir)
    assert sorted(os.listdir(out_dir / "jaxalign_sft")) == built  # the failed build left no folder
    assert sorted(os.listdir(out_dir)) == ["jaxalign_sft"]
    captured = capfd.readouterr()
    assert "Downloading" not in captured.out + captured.err and "downloaded" not in captured.out + captured.err
    assert no_network == []


def test_training_run_with_checkpoints_opens_no_socket(no_network, tmp_path):
    from tests._train_worker import run

    state, _ = run(str(tmp_path), 3, ckpt_every=2, log_every=1)
    state, _ = run(str(tmp_path), 4, ckpt_every=2, log_every=1)  # resumes from step 3
    assert int(state.step) == 4 and np.isfinite(float(np.asarray(state.params["scale"]).sum()))
    assert no_network == []
