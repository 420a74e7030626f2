"""TFDS builders: JSONL -> array_record -> data source, without TensorFlow."""

import json
import os
import re
import sys

import pytest
import tensorflow_datasets as tfds

from jaxalign import data
from jaxalign.data import DataError
from tests._tokenizers import make_char_tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def decoded(record):
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in record.items()}


SFT = [{"prompt": f"{i}+{i}=", "completion": str(2 * i), "extra": i} for i in range(23)]
PAIRS = [{"prompt": f"q{i} ✓", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(7)]
RL = [{"prompt": f"What is {i}*3?", "answer": str(3 * i)} for i in range(5)]


@pytest.mark.parametrize("kind, rows", [("sft", SFT), ("preference", PAIRS), ("prompt_answer", RL)])
def test_round_trip_keeps_count_content_and_order(tmp_path, kind, rows):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", rows[:3])
    sources = data.prepare(kind, train, test=test, data_dir=tmp_path / "tfds")
    assert set(sources) == {"train", "test"}
    for split, path, expected in (("train", train, rows), ("test", test, rows[:3])):
        source = sources[split]
        assert len(source) == len(expected)
        got = [decoded(source[i]) for i in range(len(source))]
        fields = data.SCHEMAS[kind]
        assert got == [
            {**{f: r[f] for f in fields}, "source": str(path), "line": n}
            for n, r in enumerate(expected, start=1)
        ]
    assert "tensorflow" not in sys.modules


def test_prepare_is_idempotent_and_rebuilds_on_change(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", SFT[:4])
    first = data.prepare("sft", train, data_dir=tmp_path / "tfds")["train"]
    build_dir = first.dataset_info.data_dir
    shard = next(p for p in os.listdir(build_dir) if "array_record" in p)
    stamp = os.stat(os.path.join(build_dir, shard)).st_mtime_ns

    again = data.prepare("sft", train, data_dir=tmp_path / "tfds")["train"]
    assert again.dataset_info.data_dir == build_dir
    assert os.stat(os.path.join(build_dir, shard)).st_mtime_ns == stamp  # not rewritten

    write_jsonl(train, SFT[:6])
    changed = data.prepare("sft", train, data_dir=tmp_path / "tfds")["train"]
    assert changed.dataset_info.data_dir != build_dir
    assert len(changed) == 6


def test_bad_line_fails_the_build_naming_file_and_line(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "p", "chosen": "a"}\n')
    with pytest.raises(DataError, match=re.escape(f"{train}:2: missing field 'rejected'")):
        data.prepare("preference", train, data_dir=tmp_path / "tfds")
    builds = [f for _, _, files in os.walk(tmp_path / "tfds") for f in files]
    assert not any("array_record" in f for f in builds)


def test_empty_policy_reaches_the_build(tmp_path):
    rows = [{"prompt": "p", "completion": "x"}, {"prompt": "p", "completion": ""}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(f"{train}:2: field 'completion' is empty")):
        data.prepare("sft", train, data_dir=tmp_path / "tfds")
    with pytest.warns(data.DataWarning, match="dropped 1 of 2"):
        kept = data.prepare("sft", train, data_dir=tmp_path / "tfds", empty="drop")["train"]
    assert [decoded(kept[i])["line"] for i in range(len(kept))] == [1]


def test_builder_class_with_config_and_reading_back_from_directory(tmp_path):
    train = write_jsonl(tmp_path / "rl.jsonl", RL)
    config = data.SourceConfig(name="mine", train=(str(train),))
    builder = data.JaxalignPromptAnswer(data_dir=str(tmp_path / "tfds"), config=config,
                                        file_format="array_record")
    builder.download_and_prepare()
    assert list(builder.info.splits) == ["train"]
    path = tmp_path / "tfds" / "jaxalign_prompt_answer" / "mine" / "1.0.0"
    source = data.load_prepared(path)["train"]
    assert [decoded(source[i])["answer"] for i in range(len(source))] == [r["answer"] for r in RL]
    via_tfds = tfds.data_source("jaxalign_prompt_answer/mine", split="train",
                                data_dir=str(tmp_path / "tfds"), download=False)
    assert len(via_tfds) == len(RL)


def test_builder_without_files_says_how_to_configure(tmp_path):
    builder = data.JaxalignSft(data_dir=str(tmp_path), config=data.SourceConfig(name="none"),
                               file_format="array_record")
    with pytest.raises(ValueError, match="SourceConfig"):
        builder.download_and_prepare()


def test_parquet_source(tmp_path):
    import pyarrow as pa  # a tensorflow-datasets dependency
    import pyarrow.parquet as pq
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({k: [r[k] for r in PAIRS] for k in ("prompt", "chosen", "rejected")}), path)
    source = data.prepare("preference", path, data_dir=tmp_path / "tfds")["train"]
    assert [decoded(source[i])["chosen"] for i in range(len(source))] == [r["chosen"] for r in PAIRS]


def test_gsm8k_random_mock_maps_question_and_short_answer(tmp_path):
    import tensorflow_datasets.text.gsm8k  # noqa: F401  registers the builder the raw read below names

    tok = make_char_tokenizer(tmp_path / "tok")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        raw = tfds.data_source("gsm8k", split="train")
        raw_records = [raw[i] for i in range(6)]
        source = data.gsm8k_prompts("train")
        assert len(source) == 6
        got = [source[i] for i in range(6)]
        prompts = data.tokenize_prompts(source, tok, max_length=256)
    assert got == [{"prompt": r["question"], "answer": r["short_answer"].strip()} for r in raw_records]
    assert prompts.answers == [g["answer"] for g in got]
    assert [tok.decode(t.tolist()) for t in prompts.tokens] == ["<s>" + g["prompt"] for g in got]
    assert "tensorflow" not in sys.modules


def test_gsm8k_final_answer_after_hashes():
    records = [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7",
         "annotation": "3+4=<<3+4=7>>7\n", "short_answer": "7"},
        {"question": b"Big?", "answer": b"It is 1,000.\n#### 1,000",
         "annotation": b"It is 1,000.\n", "short_answer": b"1,000 "},
    ]

    def as_data_source(self, split, *args, **kwargs):
        return records

    with tfds.testing.mock_data(as_data_source_fn=as_data_source,
                                policy=tfds.testing.MockPolicy.USE_CODE):
        source = data.gsm8k_prompts("test")
        assert [source[i] for i in range(2)] == [
            {"prompt": "Tom has 3 apples and buys 4. How many?", "answer": "7"},
            {"prompt": "Big?", "answer": "1,000"},
        ]
    # Without the split-out field, the text after the last '####' is used.
    assert data.gsm8k_record({"question": "q", "answer": "a #### b\n#### 42 "}) == {
        "prompt": "q", "answer": "42"}


def test_tensorflow_datasets_is_imported_only_when_a_builder_is_used():
    import subprocess

    code = (
        "import sys\n"
        "import jaxalign.data, jaxalign.algorithms.onpolicy, jaxalign.algorithms.dpo, jaxalign.training\n"
        "assert 'tensorflow_datasets' not in sys.modules, 'imported eagerly'\n"
        "from jaxalign.data import prepare, gsm8k_prompts\n"
        "assert 'tensorflow_datasets' in sys.modules\n"
        "assert prepare.__module__ == 'jaxalign.data.builders' and 'prepare' in dir(jaxalign.data)\n"
        "try:\n"
        "    jaxalign.data.no_such_name\n"
        "except AttributeError as e:\n"
        "    assert 'no_such_name' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
