"""Test-wide set-up.

Eight simulated CPU devices so that sharded code paths are exercised on a
laptop; the flag must be set before jax is imported anywhere.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Entry scripts run as subprocesses would otherwise write compiled programs to
# ~/.cache/jaxalign/xla; the cache has its own test (test_training_step.py).
os.environ.setdefault("JAXALIGN_COMPILE_CACHE", "0")
