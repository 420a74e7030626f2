"""TFDS builders for local sample files, written as `array_record`.

TFDS reads `array_record` without TensorFlow through `tfds.data_source` /
`builder.as_data_source()`; that is the only read path used here
(`tfds.load`, `as_dataset` and `tfds.as_numpy` need TensorFlow).

One builder per kind of sample; the source files and the empty-field policy
come in a `SourceConfig`. Records keep the file order (shuffling is the
loader's job, with its own seed) and carry `source` and `line` so that later
errors (e.g. an over-long sample under `overlong="error"`) can say where the
sample came from.

    sources = prepare("sft", "train.jsonl", data_dir="/tmp/data", test="test.jsonl")
    sources["train"][0]  # {'prompt': b'...', 'completion': b'...', 'source': b'...', 'line': 1}

Text fields come back as UTF-8 `bytes` (TFDS's choice); the tokenizers here
accept `bytes` or `str`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from jaxalign.data import records


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
    """Which files to build from.

    Attributes:
      train: sample files (JSONL, or `.parquet`) for the `train` split.
      test: sample files for an optional `test` split.
      empty: the empty-field policy of `records.read_samples`.
    """

    train: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    empty: str = "error"


class _SampleFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared body of the builders below; `KIND` picks the schema."""

    KIND: ClassVar[str]
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}

    def _info(self) -> tfds.core.DatasetInfo:
        features = {name: tfds.features.Text() for name in records.SCHEMAS[self.KIND]}
        features["source"] = tfds.features.Text()
        features["line"] = np.int64
        return self.dataset_info_from_configs(
            description=f"jaxalign {self.KIND} samples read from local files.",
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager  # local files only
        config = self.builder_config
        if not isinstance(config, SourceConfig) or not config.train:
            raise ValueError(
                f"{type(self).__name__} needs config=SourceConfig(name=..., train=[files]); "
                "or use jaxalign.data.prepare(...)"
            )
        splits = {"train": self._generate_examples(config.train)}
        if config.test:
            splits["test"] = self._generate_examples(config.test)
        return splits

    # TFDS announces "Downloading and preparing dataset ..." and "... downloaded and prepared"
    # around every build; nothing is downloaded here, so say nothing.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _generate_examples(self, paths: tuple[str, ...]):
        # A running integer key: with shuffling disabled TFDS keeps key order.
        samples = records.read_samples(paths, self.KIND, empty=self.builder_config.empty)
        for key, sample in enumerate(samples):
            yield key, sample


class JaxalignSft(_SampleFiles):
    """SFT samples: `prompt`, `completion`."""

    KIND = "sft"


class JaxalignPreference(_SampleFiles):
    """Preference pairs: `prompt`, `chosen`, `rejected`."""

    KIND = "preference"


class JaxalignPromptAnswer(_SampleFiles):
    """RL prompts with a reference answer: `prompt`, `answer`."""

    KIND = "prompt_answer"


BUILDERS: dict[str, type[_SampleFiles]] = {
    "sft": JaxalignSft,
    "preference": JaxalignPreference,
    "prompt_answer": JaxalignPromptAnswer,
}


def source_config(
    kind: str,
    train: records.PathOrPaths,
    *,
    test: records.PathOrPaths | None = None,
    empty: str = "error",
) -> SourceConfig:
    """A `SourceConfig` named after the first file and a digest of all inputs.

    The name changes whenever a file's path or bytes, the empty policy or the
    record format change, so a build under that name is always reusable.
    """
    train_paths = records.as_paths(train)
    test_paths = records.as_paths(test) if test is not None else ()
    digest = records.fingerprint(
        train_paths + test_paths, kind, empty, f"train={len(train_paths)}"
    )
    stem = os.path.splitext(os.path.basename(train_paths[0]))[0]
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_")[:40] or "samples"
    return SourceConfig(
        name=f"{stem}_{digest[:16]}", train=train_paths, test=test_paths, empty=empty
    )


def prepare(
    kind: str,
    train: records.PathOrPaths,
    *,
    data_dir: str | os.PathLike,
    test: records.PathOrPaths | None = None,
    empty: str = "error",
) -> dict[str, Any]:
    """Builds the sample files once and returns random-access sources per split.

    Args:
      kind: `"sft"`, `"preference"` or `"prompt_answer"`.
      train: JSONL (or `.parquet`) file(s) for the `train` split.
      data_dir: where TFDS writes `<builder>/<config>/<version>/`.
      test: optional file(s) for a `test` split.
      empty: policy for empty response fields (see `records.read_samples`).

    Returns:
      `{"train": source, "test": source}` (test only if given): TFDS
      `ArrayRecordDataSource`s, `len()` and `[i]` give the records in file
      order.

    Idempotent: the config name holds a digest of the files, so calling again
    with unchanged files reuses the build, and a changed file builds anew
    (old builds stay in `data_dir` until deleted). Bad input raises
    `records.DataError` naming file and line, and leaves no build behind.
    On several hosts sharing `data_dir`, call it on one process first.
    """
    records.check_kind(kind)
    config = source_config(kind, train, test=test, empty=empty)
    data_dir = os.fspath(data_dir)
    # TFDS creates these folders before it reads a sample; a failed build removes what it created.
    created = [p for p in (data_dir, os.path.join(data_dir, BUILDERS[kind].name),
                           os.path.join(data_dir, BUILDERS[kind].name, config.name),
                           os.path.join(data_dir, "downloads")) if not os.path.exists(p)]
    with _quiet_tfds():
        builder = BUILDERS[kind](data_dir=data_dir, config=config, file_format="array_record")
        try:
            builder.download_and_prepare()
        except BaseException:
            for path in reversed(created):
                shutil.rmtree(path, ignore_errors=True)
            raise
    downloads = os.path.join(data_dir, "downloads")
    if downloads in created and os.path.isdir(downloads) and not any(f for _, _, f in os.walk(downloads)):
        shutil.rmtree(downloads)  # TFDS makes it for every build; a local build leaves it empty
    return builder.as_data_source()


@contextlib.contextmanager
def _quiet_tfds():
    """No TFDS progress bars and no "Using custom data configuration" warning while a local build runs."""
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = tqdm_utils._active  # TFDS keeps its progress-bar switch in this module global
    tfds.disable_progress_bar()
    quiet = logging.getLogger("absl")
    drop = _DropMessage("Using custom data configuration")
    quiet.addFilter(drop)
    try:
        yield
    finally:
        quiet.removeFilter(drop)
        tfds.display_progress_bar(was_active)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def load_prepared(path: str | os.PathLike) -> dict[str, Any]:
    """Data sources of an existing build directory (`.../<config>/<version>`).

    Needs neither the source files nor the builder classes.
    """
    return tfds.builder_from_directory(os.fspath(path)).as_data_source()
