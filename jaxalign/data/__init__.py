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
from jaxalign.data.builders import (
    BUILDERS,
    JaxalignPreference,
    JaxalignPromptAnswer,
    JaxalignSft,
    SourceConfig,
    load_prepared,
    prepare,
    source_config,
)
from jaxalign.data.gsm8k import MappedSource, gsm8k_prompts, gsm8k_record
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
