"""Reading and validating sample files: every bad line is named by file:line."""

import json
import re
import warnings

import pytest

from jaxalign.data import records
from jaxalign.data.records import DataError, DataWarning, read_samples


def write_lines(path, lines):
    path.write_bytes(b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines))
    return path


def good(**fields):
    return json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", **fields})


def test_reads_fields_source_and_line_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [
        json.dumps({"prompt": "1+1=", "completion": "2", "id": 7}),
        "",
        "   ",
        json.dumps({"prompt": "", "completion": "héllo\n"}),
    ])
    got = list(read_samples(path, "sft"))
    assert got == [
        {"prompt": "1+1=", "completion": "2", "source": str(path), "line": 1},
        {"prompt": "", "completion": "héllo\n", "source": str(path), "line": 4},
    ]


@pytest.mark.parametrize(
    "bad, what",
    [
        ('{"prompt": "p", "chosen": "a", "rejected": ', "not valid JSON"),
        ("prompt,chosen,rejected", "not valid JSON"),
        ('["p", "a", "b"]', "expected a JSON object, got list"),
        ('"just a string"', "expected a JSON object, got str"),
        ('{"prompt": "p", "rejected": "b"}', "missing field 'chosen'"),
        ('{"prompt": "p", "chosen": null, "rejected": "b"}', "field 'chosen' is null"),
        ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "field 'chosen' must be a string, got int"),
        ('{"prompt": ["p"], "chosen": "a", "rejected": "b"}', "field 'prompt' must be a string, got list"),
        (b'{"prompt": "\xff", "chosen": "a", "rejected": "b"}', "not valid UTF-8"),
    ],
)
def test_malformed_line_names_file_line_and_problem(tmp_path, bad, what):
    path = write_lines(tmp_path / "pairs.jsonl", [good(), good(), "", bad, good()])
    with pytest.raises(DataError) as err:
        list(read_samples(path, "preference"))
    message = str(err.value)
    assert message.startswith(f"{path}:4: "), message
    assert what in message


def test_error_names_the_right_file_among_several(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [good(), good()])
    b = write_lines(tmp_path / "b.jsonl", [good(), '{"prompt": "p"}'])
    with pytest.raises(DataError, match=re.escape(f"{b}:2: missing field 'chosen'")):
        list(read_samples([a, b], "preference"))


def test_empty_completion_is_an_error_by_default(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [
        json.dumps({"prompt": "p", "completion": "x"}),
        json.dumps({"prompt": "p", "completion": "  \n"}),
    ])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'completion' is empty")):
        list(read_samples(path, "sft"))


def test_empty_drop_warns_once_with_count_and_places(tmp_path):
    lines = [json.dumps({"prompt": "p", "completion": "" if i % 3 == 0 else "x"}) for i in range(9)]
    path = write_lines(tmp_path / "sft.jsonl", lines)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(read_samples(path, "sft", empty="drop"))
    assert [s["line"] for s in got] == [2, 3, 5, 6, 8, 9]
    ours = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(ours) == 1
    assert "dropped 3 of 9" in str(ours[0].message)
    assert f"{path}:1, {path}:4, {path}:7" in str(ours[0].message)


def test_empty_keep_keeps(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [json.dumps({"prompt": "p", "completion": ""})])
    assert [s["completion"] for s in read_samples(path, "sft", empty="keep")] == [""]


def test_empty_prompt_and_answer_checked_for_prompt_answer(tmp_path):
    path = write_lines(tmp_path / "rl.jsonl", [
        json.dumps({"prompt": "q", "answer": "1"}),
        json.dumps({"prompt": "q", "answer": ""}),
    ])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'answer' is empty")):
        list(read_samples(path, "prompt_answer"))


def test_file_without_samples_is_an_error(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DataError, match="no samples"):
        list(read_samples(path, "sft"))


def test_bad_policy_and_kind_are_rejected(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [good()])
    with pytest.raises(ValueError, match="empty="):
        list(read_samples(path, "preference", empty="ignore"))
    with pytest.raises(ValueError, match="unknown data kind"):
        list(read_samples(path, "dpo"))


def test_parquet_rows_are_validated_like_lines(tmp_path):
    import pyarrow as pa  # a tensorflow-datasets dependency
    import pyarrow.parquet as pq
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "completion": ["x", None, "z"]}), path)
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'completion' is null")):
        list(read_samples(path, "sft"))
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["x", "y"]}), path)
    assert [(s["prompt"], s["line"]) for s in read_samples(path, "sft")] == [("a", 1), ("b", 2)]


def test_fingerprint_follows_content(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [good()])
    first = records.fingerprint(path, "preference")
    assert records.fingerprint(path, "preference") == first
    assert records.fingerprint(path, "sft") != first
    write_lines(path, [good(chosen="other")])
    assert records.fingerprint(path, "preference") != first
