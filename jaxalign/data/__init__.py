"""Data: sample files -> TFDS array_record -> tokens -> numpy batches.

    from jaxalign import data
    sources = data.prepare("sft", "train.jsonl", data_dir="/tmp/tfds")
    tokens = data.tokenize_sft(sources["train"], tokenizer, max_length=512)
    loader = data.Loader(tokens, batch_size=32, seed=0, buckets=64)
    batch = next(loader)   # tokens, loss_mask, attention_mask, segment_ids, positions, index

See docs/data.md for the file formats and the bad-input policies.
"""

from jaxalign.data.batching import (
    bucket_length,
    collate_preference,
    collate_prompts,
    collate_sequences,
    pack_rows,
    pad,
    plan_packing,
    positions_from_mask,
    power_of_two_buckets,
    score_width,
)
from jaxalign.data.loader import Loader
from jaxalign.data.records import SCHEMAS, DataError, DataWarning, read_samples
from jaxalign.data.tokenize import (
    PreferenceData,
    PromptData,
    SFTData,
    encode_prompts,
    encode_responses,
    tokenize_preference,
    tokenize_prompts,
    tokenize_sft,
)

# The TFDS side (builders, GSM8K) is imported on first use: `tensorflow_datasets`
# costs ~13 MB of resident memory and ~0.3 s, which a run on in-memory data
# (the demo's RL stages, the benchmarks) never needs.
_LAZY = {
    "BUILDERS": "builders", "JaxalignPreference": "builders", "JaxalignPromptAnswer": "builders",
    "JaxalignSft": "builders", "SourceConfig": "builders", "load_prepared": "builders", "prepare": "builders",
    "source_config": "builders",
    "MappedSource": "gsm8k", "gsm8k_prompts": "gsm8k", "gsm8k_record": "gsm8k",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BUILDERS",
    "DataError",
    "DataWarning",
    "JaxalignPreference",
    "JaxalignPromptAnswer",
    "JaxalignSft",
    "Loader",
    "MappedSource",
    "PreferenceData",
    "PromptData",
    "SCHEMAS",
    "SFTData",
    "SourceConfig",
    "bucket_length",
    "collate_preference",
    "collate_prompts",
    "collate_sequences",
    "encode_prompts",
    "encode_responses",
    "gsm8k_prompts",
    "gsm8k_record",
    "load_prepared",
    "pack_rows",
    "pad",
    "plan_packing",
    "positions_from_mask",
    "power_of_two_buckets",
    "prepare",
    "read_samples",
    "score_width",
    "source_config",
    "tokenize_preference",
    "tokenize_prompts",
    "tokenize_sft",
]
