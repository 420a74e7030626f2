"""The command line shared by the entry scripts: `--config path/to/config.py` plus `--config.*` overrides."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable

# Before any entry script imports transformers (jaxalign.host.enforce_offline, repeated without importing jax here).
os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def launch(run: Callable, help_text: str = "experiment config file") -> None:
    """Parse `--config` (an ml_collections config file) and call `run(config)`.

    The flag is defined here, at launch, not at import: the scripts import
    each other's helpers, and absl refuses a flag defined twice. JAX's
    persistent compilation cache is turned on first (`jaxalign.host.
    enable_compilation_cache`; `JAXALIGN_COMPILE_CACHE=0` turns it off), so a
    rerun of an experiment skips XLA's compiles and their memory.
    """
    from absl import app, flags
    from ml_collections import config_flags

    from experiments.wiring import ConfigError

    config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
    flags.mark_flags_as_required(["config"])
    def main(argv) -> None:
        del argv
        from jaxalign.host import enable_compilation_cache

        quiet_absl(flags.FLAGS["verbosity"].present)
        check_model_paths(flags.FLAGS.config)
        enable_compilation_cache()
        try:
            run(flags.FLAGS.config)  # its return value is for callers in Python, not an exit status
        except ConfigError as e:
            sys.exit(f"error: {e}")

    app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad `--config.*` override reported in one line."""
    from absl import flags

    # Paths given on the command line are checked before the config file is loaded (it imports jax).
    check_model_paths({"model": {k: a.split("=", 1)[1] for a in argv for k in ("path", "tokenizer")
                                 if a.startswith(f"--config.model.{k}=")}})
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl and ml_collections raise several kinds
        try:
            line = override_error(argv)
        except Exception:  # noqa: BLE001 - the config file itself fails: absl's own message says how
            raise e from None
        sys.exit(f"error: {line or str(e).splitlines()[-1]}")


def override_error(argv: list[str]) -> str | None:
    """The first `--config.<section>.<key>=` override that names no key of the config file, as one line."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None and "--config" in argv[:-1]:
        path = argv[argv.index("--config") + 1]
    if path is None:
        return None
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_jaxalign_config", file)
    if spec is None or spec.loader is None:
        return f"--config: cannot read {file!r}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    for a in argv:
        if not a.startswith("--config."):
            continue
        keys = a[len("--config."):].split("=", 1)[0].split(".")
        node, where = config, "config"
        for key in keys:
            if not hasattr(node, "keys") or key not in node:
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
                return f"{where}: unknown key {key!r}; valid keys: {valid}"
            node, where = node[key], f"{where}.{key}"
    return None


def quiet_absl(verbosity_given: bool) -> None:
    """absl (Orbax, TFDS) logs WARNING and above unless `--verbosity` was given: their INFO lines
    (hundreds per run) would bury the progress bar and jaxalign's own lines."""
    from absl import logging

    if not verbosity_given:
        logging.set_verbosity(logging.WARNING)


def check_model_paths(config) -> None:
    """Fail at once, naming the path, if `config.model.path` or `.tokenizer` is not on this machine
    (empty: a tiny random model; "smollm2": the packaged GGUF)."""
    from jaxalign.host import resolve_local_path  # light: no jax, no transformers

    model = config.get("model") if hasattr(config, "get") else None
    if model is None:
        return
    for key in ("path", "tokenizer"):
        value = model.get(key, "")
        if value and value != "smollm2":
            try:
                resolve_local_path(value, what=f"config.model.{key}")
            except FileNotFoundError as e:
                sys.exit(f"error: {e}")
