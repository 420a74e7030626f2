"""The command line shared by the entry scripts: `--config path/to/config.py` plus `--config.*` overrides."""

from __future__ import annotations

from typing import Callable


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

    config_flags.DEFINE_config_file("config", None, help_text, lock_config=True)
    flags.mark_flags_as_required(["config"])
    def main(argv) -> None:
        del argv
        from jaxalign.host import enable_compilation_cache

        enable_compilation_cache()
        run(flags.FLAGS.config)  # its return value is for callers in Python, not an exit status

    app.run(main)
