"""A real 2-process run (4 CPU devices each, gloo over loopback) equals 1 process."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests._train_worker import run_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_and_one_device(tmp_path):
    out = tmp_path / "out.json"
    port = _free_port()
    procs = []
    try:
        for pid in range(2):
            env = {
                **os.environ,
                "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "JAXALIGN_COORDINATOR": f"127.0.0.1:{port}",
                "JAXALIGN_NUM_PROCESSES": "2",
                "JAXALIGN_PROCESS_ID": str(pid),
            }
            cmd = [sys.executable, os.path.join(REPO, "tests", "_multiproc_worker.py"),
                   str(out), str(tmp_path / "ckpt"), str(STEPS)]
            log = open(tmp_path / f"log{pid}.txt", "w")
            procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        # Reference runs in this process while the workers start.
        one_proc = run_steps("8", STEPS)[1]
        one_dev = run_steps("one", STEPS)[1]
        for p, _ in procs:
            p.wait(timeout=150)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
            log.close()
    logs = [(tmp_path / f"log{i}.txt").read_text()[-3000:] for i in range(2)]
    assert [p.returncode for p, _ in procs] == [0, 0], logs
    result = json.loads(out.read_text())
    assert result["all_processes_ok"], result["checks"]
    assert result["checks"]["rows"] == [0, 4]  # process 0 fed rows 0-3 of 8
    assert len(result["metrics"]) == STEPS
    for multi, single, dev in zip(result["metrics"], one_proc, one_dev):
        for k in ("loss", "grad_norm"):
            assert multi[k] == pytest.approx(float(single[k]), abs=1e-5), k
            assert multi[k] == pytest.approx(float(dev[k]), abs=1e-5), k
        assert multi["lr"] == pytest.approx(float(single["lr"]), rel=1e-6)
