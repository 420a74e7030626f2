"""Host (CPU RAM) housekeeping shared by the layers that compile or load."""

from __future__ import annotations

import ctypes
import os

# The XLA:CPU option a train step is compiled with (see `train_step_compiler_options`).
_YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"


def release_host_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`); a no-op elsewhere.

    XLA's compiler and the checkpoint reader free what they allocate, but
    glibc keeps the pages in its arenas, where they still count as resident
    memory and stack under the next peak (the first run of a compiled step).
    Called after each compile and after loading a checkpoint.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def train_step_compiler_options(platform: str) -> dict[str, str] | None:
    """Extra XLA compiler options for a train step on `platform` ("cpu", "gpu", "tpu").

    On CPU: YNNPACK fusions of a dot with its neighbours
    (`LIBRARY_FUSION_TYPE_DOT`) in place of XLA's default of single dots.
    The backward's GEMMs read transposed weights and activations; as single
    dots XLA first copies each operand into a fresh transposed buffer, as
    fusions most of those copies go away. Measured in docs/training.md
    (SmolLM2-135M DPO step 5-7% faster, ~140 MiB less peak memory). The
    sampler keeps XLA's default: its decode steps were not faster this way.

    None (the compiler's defaults) elsewhere, when `JAXALIGN_XLA_DEFAULTS=1`
    asks for XLA's own defaults, or when `XLA_FLAGS` already sets the option
    (the user's choice wins).
    """
    if platform != "cpu" or os.environ.get("JAXALIGN_XLA_DEFAULTS") == "1":
        return None
    if _YNN_FUSION_TYPE in os.environ.get("XLA_FLAGS", ""):
        return None
    return {_YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_DOT"}
