"""Host housekeeping shared by the layers that compile or load: CPU RAM, compiler options, local files only."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

# The XLA:CPU options a train step and the sampler are compiled with (see `train_step_compiler_options`
# and `sampler_compiler_options`).
_YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
_FUSION_EMITTERS = "xla_cpu_use_fusion_emitters"


# What Hugging Face libraries read to stay off the network (read when they are imported).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def enforce_offline() -> None:
    """Set Hugging Face's offline switches (`OFFLINE_ENV`) in this process's environment.

    jaxalign reads local files only: a model or tokenizer name that is not a
    local path must fail at once, not spend a minute retrying the Hub (which
    `from_pretrained` does for anything shaped like `org/name`). Called when
    `jaxalign` is imported and again by the entry scripts before anything
    imports transformers or huggingface_hub, which read these at import.
    Forced, not defaulted: a "0" in the environment would let a download through.
    """
    os.environ.update(OFFLINE_ENV)


def resolve_local_path(path: str | os.PathLike, *, what: str = "model path") -> Path:
    """`path` as a local `Path` (with `~` expanded) if it exists; else FileNotFoundError naming it.

    jaxalign loads local directories and files only: a Hub name such as
    `org/model` is refused here at once, before `transformers` could try the
    network with it.
    """
    text = os.fspath(path)
    local = Path(os.path.expanduser(text))
    if not text or not local.exists():
        raise FileNotFoundError(f"{what} {text!r} does not exist on this machine "
                                "(jaxalign loads local directories only; it downloads nothing)")
    return local


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
    (SmolLM2-135M DPO step 5-7% faster, ~140 MiB less peak memory). Plus
    YNNPACK reductions (`LIBRARY_FUSION_TYPE_REDUCE`, on in XLA's default):
    without them XLA writes the gradient norm's squares out and reduces them
    ~15x slower (docs/training.md, "The optimizer update"). The
    sampler does without it: its decode steps were not faster this way.
    A one-program step gets them; a step split in two (a small model's,
    `TrainStep`) gets them for its gradient program and compiles its update
    program (no dots) with XLA's defaults.

    None (the compiler's defaults) elsewhere, when `JAXALIGN_XLA_DEFAULTS=1`
    asks for XLA's own defaults, or when `XLA_FLAGS` already sets the option
    (the user's choice wins).
    """
    return _cpu_option(platform, _YNN_FUSION_TYPE, "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE")


def sampler_compiler_options(platform: str) -> dict[str, bool] | None:
    """Extra XLA compiler options for the sampler's program on `platform` ("cpu", "gpu", "tpu").

    On CPU: XLA's classic element-wise code generator
    (`xla_cpu_use_fusion_emitters=False`) in place of its MLIR fusion
    emitters. The emitters hold ~1.3 MB of compiler state per distinct kernel
    until the whole program is built; the classic generator ~0.4 MB. Measured
    in docs/sampling.md: the compile's host-memory peak +142 -> +43 MB on the
    tiny Llama, +204 -> +137 MB on SmolLM2-135M, generation as fast, the
    SmolLM2 program's compile 5 -> 12 s (once; the persistent cache keeps it).
    Train steps keep the emitters: there the classic generator's compile time
    grows faster than the layer count and saves nothing at SmolLM2's depth.

    None elsewhere, when `JAXALIGN_XLA_DEFAULTS=1`, or when `XLA_FLAGS`
    already sets the option (the user's choice wins).
    """
    return _cpu_option(platform, _FUSION_EMITTERS, False)


def _cpu_option(platform: str, key: str, value: str | bool) -> dict[str, str | bool] | None:
    """`{key: value}` on CPU; None elsewhere, under `JAXALIGN_XLA_DEFAULTS=1`, or when `XLA_FLAGS` sets `key`."""
    if platform != "cpu" or os.environ.get("JAXALIGN_XLA_DEFAULTS") == "1":
        return None
    if key in os.environ.get("XLA_FLAGS", ""):
        return None
    return {key: value}


# `enable_compilation_cache`'s switch: unset = the default directory, "0"/"off"/"false" = off, else a directory.
CACHE_ENV = "JAXALIGN_COMPILE_CACHE"


def cache_root() -> str:
    """jaxalign's on-disk cache root: `$JAXALIGN_CACHE`, default `~/.cache/jaxalign`.

    Converted GGUF checkpoints live under `gguf/`, compiled programs under `xla/`.
    """
    return os.environ.get("JAXALIGN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "jaxalign"))


def _host_fingerprint() -> str:
    """A short hash of what a compiled CPU program depends on: CPU model and ISA flags, jaxlib.

    JAX's own cache key names the platform ("cpu") but not the CPU, so a cache
    shared by hosts with different instruction sets (a home directory on a
    cluster) could hand one host code built for another. One subdirectory per
    fingerprint keeps them apart.
    """
    import hashlib
    import platform

    import jaxlib

    fields: dict[str, str] = {}  # the first core's; x86 names its ISA "flags", ARM "Features"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "Features"):
                    fields.setdefault(key, value.strip())
    except OSError:
        fields["processor"] = platform.processor()
    parts = [platform.machine(), getattr(jaxlib, "__version__", "?"), *(fields[k] for k in sorted(fields))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def enable_compilation_cache(directory: str | os.PathLike | None = None, *,
                             max_size_bytes: int = 4 << 30) -> str | None:
    """Turn on JAX's persistent compilation cache; returns its directory, or None when off.

    A compiled program (a train step, the sampler's decode loop) is written to
    disk and read back by the next process that compiles the same program with
    the same options on the same kind of host, which then skips XLA entirely.
    On CPU that is most of a run's start-up and, for small models, most of its
    peak memory: XLA:CPU's code generation holds +120-250 MB while it compiles
    the tiny GRPO step, which a cache hit never allocates (README, Benchmarks).
    The cached executable is the one the compiler produced, so results are
    identical to a fresh compile's.

    Precedence: `$JAXALIGN_COMPILE_CACHE` = "0", "off" or "false" turns it off;
    a directory set in JAX already (`JAX_COMPILATION_CACHE_DIR` or
    `jax.config.update("jax_compilation_cache_dir", ...)`) is kept with the
    user's own thresholds; otherwise `directory`, else `$JAXALIGN_COMPILE_CACHE`,
    else `$JAXALIGN_CACHE/xla/<host fingerprint>` (default root
    `~/.cache/jaxalign`). Every program is cached, however short its compile
    (JAX's default skips those under 1 s, and they still add memory), and the
    least recently used entries are evicted beyond `max_size_bytes` (when
    `filelock` is installed; it comes with transformers).

    The entry scripts (`experiments/`) call this at launch; library users call
    it once, before their first compile (calling later also works: JAX re-reads
    the setting). The directory is created private (0700): JAX trusts what it
    loads from it.
    """
    import jax

    switch = os.environ.get(CACHE_ENV, "").strip()
    if directory is None and switch.lower() in ("0", "off", "false", "no"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return str(current)
    if directory is None:
        if switch:
            directory = switch
        else:
            directory = os.path.join(cache_root(), "xla", _host_fingerprint())
    directory = os.fspath(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        import filelock  # noqa: F401  (JAX's LRU eviction needs it)

        jax.config.update("jax_compilation_cache_max_size", int(max_size_bytes))
    except ImportError:
        pass
    jax.config.update("jax_compilation_cache_dir", directory)
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # re-read the setting even if something compiled already
    return directory
