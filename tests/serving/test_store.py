from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from lpt_serve.errors import (
    InvalidTaskName,
    LptServeError,
    NothingToRollBack,
    StoreError,
    StoreUnwritable,
    TaskNotFound,
)
from lpt_serve.format import CONFIG_NAME, TASK_NAME_PATTERN, WEIGHTS_NAME, validate_task_name
from lpt_serve.serving import store as store_mod
from lpt_serve.serving.store import AdapterStore, TaskRecord

REPO_ROOT = Path(__file__).resolve().parents[2]


def cfg(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


def weights(n: int) -> bytes:
    return bytes([n % 256]) * 1000


def read_version(record: TaskRecord, version: int | None = None) -> tuple[bytes, bytes]:
    d = record.path(version)
    return (d / CONFIG_NAME).read_bytes(), (d / WEIGHTS_NAME).read_bytes()


def state_on_disk(root: Path, task: str) -> dict:
    return json.loads((root / task / "state.json").read_text())


# ---- basics ------------------------------------------------------------------------------------------------


def test_commit_creates_increasing_versions(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    r1 = s.commit("sst2", cfg(1), weights(1))
    r2 = s.commit("sst2", cfg(2), weights(2))
    r3 = s.commit("sst2", cfg(3), weights(3))
    assert (r1.current, r2.current, r3.current) == (1, 2, 3)
    assert r3.versions == (1, 2, 3)
    assert r3.history == (1, 2, 3)
    assert read_version(r3) == (cfg(3), weights(3))
    assert read_version(r3, 1) == (cfg(1), weights(1))
    assert r3.path() == tmp_path.resolve() / "sst2" / "v3"
    assert state_on_disk(tmp_path, "sst2") == {"current": 3, "history": [1, 2, 3]}
    assert sorted(p.name for p in r3.path().iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    assert not (tmp_path / "sst2" / "state.json.tmp").exists()
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_record_path_rejects_unknown_version(tmp_path: Path) -> None:
    r = AdapterStore(tmp_path).commit("sst2", cfg(1), weights(1))
    with pytest.raises(ValueError):
        r.path(7)


def test_get_and_tasks(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    assert s.tasks() == {}
    with pytest.raises(TaskNotFound):
        s.get("nope")
    s.commit("zeta", cfg(1), weights(1))
    s.commit("alpha", cfg(1), weights(1))
    s.commit("alpha", cfg(2), weights(2))
    tasks = s.tasks()
    assert list(tasks) == ["alpha", "zeta"]
    assert tasks["alpha"] == s.get("alpha")
    assert s.get("alpha").current == 2
    assert s.get("zeta").versions == (1,)
    # A second store on the same root sees the same thing.
    assert AdapterStore(tmp_path).tasks() == tasks


def test_commit_dir_copies_only_adapter_files(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / CONFIG_NAME).write_bytes(cfg(9))
    (src / WEIGHTS_NAME).write_bytes(weights(9))
    (src / "README.md").write_text("not part of an adapter")
    s = AdapterStore(tmp_path / "root")
    r = s.commit_dir("demo", src)
    assert r.current == 1
    assert read_version(r) == (cfg(9), weights(9))
    assert sorted(p.name for p in r.path().iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_commit_dir_rejects_incomplete_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / CONFIG_NAME).write_bytes(cfg(1))
    s = AdapterStore(tmp_path / "root")
    with pytest.raises(StoreError, match=WEIGHTS_NAME):
        s.commit_dir("demo", src)
    assert s.tasks() == {}
    assert not (tmp_path / "root" / "demo").exists()


def test_commit_rejects_non_bytes(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    with pytest.raises(TypeError):
        s.commit("t", "not bytes", b"w")  # type: ignore[arg-type]


def test_failed_write_leaves_no_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = AdapterStore(tmp_path)
    s.commit("t", cfg(1), weights(1))

    def boom(stage: str) -> None:
        if stage == "write-weights":
            raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_crash_hook", boom)
    with pytest.raises(StoreUnwritable, match="disk full"):
        s.commit("t", cfg(2), weights(2))
    assert list((tmp_path / ".tmp").iterdir()) == []
    assert s.get("t").current == 1
    assert s.get("t").versions == (1,)


# ---- rollback ----------------------------------------------------------------------------------------------


def test_rollback(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    for n in (1, 2, 3):
        s.commit("t", cfg(n), weights(n))
    r = s.rollback("t")
    assert (r.current, r.history, r.versions) == (2, (1, 2), (1, 2, 3))
    assert s.get("t") == r
    assert read_version(s.get("t")) == (cfg(2), weights(2))
    assert state_on_disk(tmp_path, "t") == {"current": 2, "history": [1, 2]}
    r = s.rollback("t")
    assert (r.current, r.history) == (1, (1,))
    with pytest.raises(NothingToRollBack):
        s.rollback("t")
    assert s.get("t").current == 1


def test_commit_after_rollback_gets_next_number(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    s.commit("t", cfg(1), weights(1))
    s.commit("t", cfg(2), weights(2))
    s.rollback("t")
    r = s.commit("t", cfg(3), weights(3))
    # v2 still exists on disk, so the new upload must not reuse its number.
    assert (r.current, r.history, r.versions) == (3, (1, 3), (1, 2, 3))
    assert s.rollback("t").current == 1


def test_rollback_single_version_and_missing(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    s.commit("t", cfg(1), weights(1))
    with pytest.raises(NothingToRollBack):
        s.rollback("t")
    with pytest.raises(TaskNotFound):
        s.rollback("absent")
    assert issubclass(NothingToRollBack, LptServeError)
    assert issubclass(TaskNotFound, LptServeError)


# ---- retire ------------------------------------------------------------------------------------------------


def test_retire_then_commit_starts_fresh_at_v1(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    s.commit("t", cfg(1), weights(1))
    s.commit("t", cfg(2), weights(2))
    s.commit("other", cfg(1), weights(1))
    s.retire("t")
    assert list(s.tasks()) == ["other"]
    with pytest.raises(TaskNotFound):
        s.get("t")
    assert not (tmp_path / "t").exists()
    assert list((tmp_path / ".tmp").iterdir()) == []
    with pytest.raises(TaskNotFound):
        s.retire("t")
    # Documented: the task directory is gone, so numbering restarts and history is fresh.
    r = s.commit("t", cfg(5), weights(5))
    assert (r.current, r.versions, r.history) == (1, (1,), (1,))
    assert read_version(r) == (cfg(5), weights(5))
    with pytest.raises(NothingToRollBack):
        s.rollback("t")


# ---- names -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["..", ".", "a/b", "/etc", "../x", "UPPER", "Sst2", "", "a" * 65, "-lead", "_lead", "a b", "a\n", "ü", ".tmp"],
)
def test_invalid_task_names_rejected(tmp_path: Path, name: str) -> None:
    s = AdapterStore(tmp_path)
    with pytest.raises(InvalidTaskName):
        validate_task_name(name)
    with pytest.raises(InvalidTaskName):
        s.commit(name, cfg(1), weights(1))
    with pytest.raises(InvalidTaskName):
        s.get(name)
    with pytest.raises(InvalidTaskName):
        s.retire(name)
    with pytest.raises(InvalidTaskName):
        s.rollback(name)
    assert isinstance(InvalidTaskName(name), ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".tmp"]


def test_non_string_task_name_rejected() -> None:
    with pytest.raises(InvalidTaskName):
        validate_task_name(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["a", "sst2", "0", "a-b_c", "a" * 64])
def test_valid_task_names(name: str) -> None:
    assert validate_task_name(name) == name
    assert TASK_NAME_PATTERN.fullmatch(name)


# ---- recover and foreign entries ---------------------------------------------------------------------------


def test_recover_removes_staging_and_incomplete_versions(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    s.commit("t", cfg(1), weights(1))
    s.commit("t", cfg(2), weights(2))
    staging = tmp_path / ".tmp" / "stage-t-deadbeef"
    staging.mkdir()
    (staging / CONFIG_NAME).write_bytes(cfg(3))
    (tmp_path / ".tmp" / "retired-x-cafe").mkdir()
    (tmp_path / ".tmp" / "stray-file").write_bytes(b"x")
    # An incomplete unreferenced version (only possible by hand; rename never produces one).
    partial = tmp_path / "t" / "v3"
    partial.mkdir()
    (partial / WEIGHTS_NAME).write_bytes(b"half")
    # A complete orphan (crash between rename and state update) is kept, by design.
    orphan = tmp_path / "t" / "v4"
    orphan.mkdir()
    (orphan / CONFIG_NAME).write_bytes(cfg(4))
    (orphan / WEIGHTS_NAME).write_bytes(weights(4))
    (tmp_path / "t" / "state.json.tmp").write_text("{")

    removed = s.recover()
    assert sorted(removed) == sorted(
        [".tmp/stage-t-deadbeef", ".tmp/retired-x-cafe", ".tmp/stray-file", "t/v3", "t/state.json.tmp"]
    )
    assert list((tmp_path / ".tmp").iterdir()) == []
    r = s.get("t")
    assert (r.current, r.versions, r.history) == (2, (1, 2, 4), (1, 2))
    assert s.recover() == []
    # Numbering continues past the orphan rather than reusing its number.
    assert s.commit("t", cfg(5), weights(5)).current == 5


def test_recover_never_removes_a_version_it_could_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error while checking a complete orphan (EIO, ESTALE on NFS) stops recovery with the store's error,
    rather than being taken for "incomplete": taken for that, recovery would delete a complete version."""
    import errno

    s = AdapterStore(tmp_path)
    s.commit("t", cfg(1), weights(1))
    orphan = tmp_path / "t" / "v2"
    orphan.mkdir()
    (orphan / CONFIG_NAME).write_bytes(cfg(2))
    (orphan / WEIGHTS_NAME).write_bytes(weights(2))
    real_stat = os.stat

    def flaky_stat(path, *args, **kwargs):
        if str(path).startswith(str(orphan)):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(store_mod.os, "stat", flaky_stat)
    with pytest.raises(StoreUnwritable, match="I/O error"):
        s.recover()
    monkeypatch.undo()
    assert (orphan / WEIGHTS_NAME).read_bytes() == weights(2)
    assert s.get("t").versions == (1, 2)


def test_link_loops_named_like_a_task_or_a_version_are_skipped(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    s.commit("t", cfg(1), weights(1))
    os.symlink("loop", tmp_path / "loop")
    os.symlink("v9", tmp_path / "t" / "v9")
    reopened = AdapterStore(tmp_path)
    assert reopened.task_names() == ["t"] and reopened.get("t").versions == (1,)


def test_recover_runs_at_open(tmp_path: Path) -> None:
    AdapterStore(tmp_path).commit("t", cfg(1), weights(1))
    (tmp_path / ".tmp" / "stage-t-0").mkdir()
    AdapterStore(tmp_path)
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_recovery_can_be_left_to_later_and_a_server_runs_it_before_its_index(tmp_path: Path) -> None:
    from lpt_serve.serving.service import ServiceConfig, open_store

    AdapterStore(tmp_path).commit("t", cfg(1), weights(1))
    (tmp_path / ".tmp" / "stage-t-0").mkdir()
    (tmp_path / "t" / "v7").mkdir()  # an incomplete version no state names
    store = AdapterStore(tmp_path, recover=False)
    assert (tmp_path / ".tmp" / "stage-t-0").exists() and store.get("t").current == 1  # reads need no recovery
    store.recover_at_open()
    assert list((tmp_path / ".tmp").iterdir()) == [] and not (tmp_path / "t" / "v7").exists()
    (tmp_path / ".tmp" / "stage-t-1").mkdir()
    (tmp_path / "t" / "v8").mkdir()
    opened = open_store(ServiceConfig(store=tmp_path, seed_from=None))
    assert list(opened.index.result(timeout=30).entries) == ["t"]
    assert list((tmp_path / ".tmp").iterdir()) == [] and not (tmp_path / "t" / "v8").exists()


def test_recover_keeps_referenced_version_even_if_incomplete(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    s.commit("t", cfg(1), weights(1))
    s.commit("t", cfg(2), weights(2))
    (tmp_path / "t" / "v1" / WEIGHTS_NAME).unlink()  # damaged by hand; history still references it
    assert s.recover() == []
    assert (tmp_path / "t" / "v1").is_dir()
    # Rollback must not land on a version that cannot be served.
    with pytest.raises(NothingToRollBack):
        s.rollback("t")
    assert s.get("t").current == 2


def test_non_task_entries_ignored(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "store.py").write_text("")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "store.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "README").write_text("a file with a task-like name")
    (tmp_path / "Upper").mkdir()
    (tmp_path / "no-state").mkdir()  # valid name, but never committed
    (tmp_path / "no-state" / "v1").mkdir()
    s = AdapterStore(tmp_path)
    s.commit("real", cfg(1), weights(1))
    assert list(s.tasks()) == ["real"]
    with pytest.raises(TaskNotFound):
        s.get("no-state")
    assert (tmp_path / "__pycache__" / "store.cpython-311.pyc").exists()
    assert (tmp_path / "Upper").is_dir()


def test_corrupt_or_dangling_state_not_served(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    s.commit("good", cfg(1), weights(1))
    s.commit("bad", cfg(1), weights(1))
    s.commit("dangling", cfg(1), weights(1))
    (tmp_path / "bad" / "state.json").write_text("{not json")
    (tmp_path / "dangling" / "state.json").write_text(json.dumps({"current": 9, "history": [1, 9]}))
    assert list(s.tasks()) == ["good"]
    for name in ("bad", "dangling"):
        with pytest.raises(TaskNotFound):
            s.get(name)
    # Rolling back the dangling task brings back its last good version.
    assert s.rollback("dangling").current == 1
    # Committing over a corrupt state starts a new history rather than refusing.
    r = s.commit("bad", cfg(2), weights(2))
    assert (r.current, r.history) == (2, (2,))


def test_scan_reports_each_task_with_the_stamp_of_the_state_it_read(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    s.commit("good", cfg(1), weights(1))
    s.commit("good", cfg(2), weights(2))
    s.commit("bad", cfg(1), weights(1))
    s.commit("dangling", cfg(1), weights(1))
    (tmp_path / "bad" / "state.json").write_text("{not json")
    (tmp_path / "dangling" / "state.json").write_text(json.dumps({"current": 9, "history": [1, 9]}))
    (tmp_path / "unborn").mkdir()  # a directory with no state.json: never committed
    scanned = {t.task: t for t in s.scan()}
    assert sorted(scanned) == ["bad", "dangling", "good", "unborn"]
    good = scanned["good"]
    assert good.error is None and good.record == s.get("good") and good.record.versions == (1, 2)
    assert isinstance(scanned["bad"].error, StoreError) and scanned["bad"].record is None
    assert scanned["dangling"].record is None and scanned["dangling"].error is None
    assert scanned["unborn"] == store_mod.ScannedTask("unborn", None, None, None)
    for name in ("good", "bad", "dangling"):
        assert scanned[name].stamp == s.state_stamp(name) is not None
    s.commit("good", cfg(3), weights(3))
    assert next(t for t in s.scan() if t.task == "good").stamp not in (None, good.stamp)


def test_seeding_copies_the_source_once_in_a_stores_life(tmp_path: Path) -> None:
    source = AdapterStore(tmp_path / "seed")
    source.commit("one", cfg(1), weights(1))
    source.commit("two", cfg(2), weights(2))
    source.commit("two", cfg(3), weights(3))
    s = AdapterStore(tmp_path / "store")
    assert sorted(s.seed(tmp_path / "seed")) == ["one", "two"]
    # The current version's files, as v1 of a fresh history.
    assert read_version(s.get("two")) == (cfg(3), weights(3)) and s.get("two").current == 1
    s.retire("one")
    # A retired seed task stays retired at the next start.
    assert s.seed(tmp_path / "seed") == [] and sorted(s.tasks()) == ["two"]


def test_seeding_leaves_a_store_that_has_tasks_alone(tmp_path: Path) -> None:
    source = AdapterStore(tmp_path / "seed")
    source.commit("one", cfg(1), weights(1))
    s = AdapterStore(tmp_path / "store")
    s.commit("mine", cfg(2), weights(2))
    assert s.seed(tmp_path / "seed") == [] and sorted(s.tasks()) == ["mine"]


def test_a_read_only_store_object_writes_nothing(tmp_path: Path) -> None:
    source = AdapterStore(tmp_path / "seed")
    source.commit("one", cfg(1), weights(1))
    (tmp_path / "seed" / ".lock").unlink()
    shutil.rmtree(tmp_path / "seed" / ".tmp")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "seed").rglob("*"))
    assert list(AdapterStore.read_only(tmp_path / "seed").tasks()) == ["one"]
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "seed").rglob("*")) == before


# ---- concurrency -------------------------------------------------------------------------------------------


def test_concurrent_commits_from_two_store_objects(tmp_path: Path) -> None:
    # Two objects on one root have separate thread locks, so only the flock keeps them apart.
    stores = [AdapterStore(tmp_path), AdapterStore(tmp_path)]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(5):
                stores[i % 2].commit("t", cfg(i * 100 + j), weights(j))
        except BaseException as e:  # surfaced via the list below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    r = stores[0].get("t")
    assert r.versions == tuple(range(1, 31))
    assert sorted(r.history) == list(range(1, 31))
    assert r.current == 30 == r.history[-1]


def test_reads_during_commits_always_see_whole_versions(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    s.commit("t", cfg(0), weights(0))
    stop = threading.Event()
    problems: list[str] = []
    seen: set[int] = set()

    def reader() -> None:
        while not stop.is_set():
            try:
                r = s.tasks()["t"]
                c, w = read_version(r)
                if json.loads(c)["n"] != r.current - 1 or w != weights(r.current - 1):
                    problems.append(f"v{r.current} has wrong content")
                seen.add(r.current)
            except Exception as e:  # any failure is the finding
                problems.append(repr(e))

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for n in range(1, 30):
            s.commit("t", cfg(n), weights(n))
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert problems == []
    assert seen


# ---- real crashes (SIGKILL in a subprocess) ----------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, threading
    from lpt_serve.serving import store

    root, stage, action = sys.argv[1], sys.argv[2], sys.argv[3]

    def hook(name):
        if name == stage:
            print(name, flush=True)
            threading.Event().wait()  # block until the parent SIGKILLs us

    store._crash_hook = hook
    s = store.AdapterStore(root)
    if action == "commit":
        s.commit("demo", b'{"n": 2}', b"\\xab" * int(sys.argv[4]))
    else:
        s.retire("demo")
    print("finished", flush=True)
    """
)

BIG = 50 * 1024 * 1024


def kill_child_at(root: Path, stage: str, action: str = "commit", size: int = BIG) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), stage, action, str(size)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO_ROOT,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "child never reached the crash point"
        line = proc.stdout.readline().decode().strip()
        assert line == stage, f"child said {line!r}; stderr: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def seed(root: Path) -> bytes:
    w1 = b"\x01" * 4096
    AdapterStore(root).commit("demo", b'{"n": 1}', w1)
    return w1


def test_crash_mid_weights_write_keeps_previous_version(tmp_path: Path) -> None:
    w1 = seed(tmp_path)
    kill_child_at(tmp_path, "write-weights")

    # Before anyone recovers, the half-written upload sits in staging and nothing else changed.
    staged = list((tmp_path / ".tmp").iterdir())
    assert len(staged) == 1 and staged[0].name.startswith("stage-demo-")
    partial = (staged[0] / WEIGHTS_NAME).stat().st_size
    assert 0 < partial < BIG
    assert state_on_disk(tmp_path, "demo") == {"current": 1, "history": [1]}
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["state.json", "v1"]

    s = AdapterStore(tmp_path)
    assert list((tmp_path / ".tmp").iterdir()) == []
    r = s.get("demo")
    assert (r.current, r.versions, r.history) == (1, (1,), (1,))
    assert read_version(r) == (b'{"n": 1}', w1)

    r = s.commit("demo", b'{"n": 3}', b"\x03" * 10)
    assert (r.current, r.history) == (2, (1, 2))
    assert read_version(r) == (b'{"n": 3}', b"\x03" * 10)


def test_crash_after_staging_before_rename(tmp_path: Path) -> None:
    w1 = seed(tmp_path)
    kill_child_at(tmp_path, "staged", size=1024)
    s = AdapterStore(tmp_path)
    assert list((tmp_path / ".tmp").iterdir()) == []
    r = s.get("demo")
    assert (r.current, r.versions) == (1, (1,))
    assert read_version(r) == (b'{"n": 1}', w1)
    assert s.commit("demo", b"{}", b"x").current == 2


def test_crash_between_rename_and_state_update(tmp_path: Path) -> None:
    w1 = seed(tmp_path)
    kill_child_at(tmp_path, "renamed")

    # The new version is fully in place but state.json was never pointed at it.
    assert (tmp_path / "demo" / "v2" / WEIGHTS_NAME).stat().st_size == BIG
    assert state_on_disk(tmp_path, "demo") == {"current": 1, "history": [1]}

    s = AdapterStore(tmp_path)
    assert list((tmp_path / ".tmp").iterdir()) == []
    r = s.get("demo")
    assert (r.current, r.history) == (1, (1,))
    assert r.versions == (1, 2)  # the orphan is kept (documented) but never served
    assert read_version(r) == (b'{"n": 1}', w1)

    r = s.commit("demo", b'{"n": 3}', b"\x03")
    assert (r.current, r.history) == (3, (1, 3))
    assert s.rollback("demo").current == 1


def test_crash_mid_retire_leaves_task_gone(tmp_path: Path) -> None:
    seed(tmp_path)
    AdapterStore(tmp_path).commit("keep", b"{}", b"k")
    kill_child_at(tmp_path, "retire-renamed", action="retire")

    assert not (tmp_path / "demo").exists()
    assert [p.name.startswith("retired-demo-") for p in (tmp_path / ".tmp").iterdir()] == [True]

    s = AdapterStore(tmp_path)
    assert list((tmp_path / ".tmp").iterdir()) == []
    assert list(s.tasks()) == ["keep"]
    assert s.commit("demo", b"{}", b"x").current == 1


def test_lock_released_when_holder_is_killed(tmp_path: Path) -> None:
    # The child dies while holding the flock; the kernel must release it or this commit would hang.
    seed(tmp_path)
    kill_child_at(tmp_path, "state-replaced", size=16)
    s = AdapterStore(tmp_path)
    assert s.get("demo").current == 2
    done = threading.Event()

    def commit() -> None:
        s.commit("demo", b"{}", b"y")
        done.set()

    t = threading.Thread(target=commit, daemon=True)
    t.start()
    assert done.wait(30)
    assert s.get("demo").current == 3


def test_replicas_seeding_a_new_store_together_seed_it_once(tmp_path):
    """Replicas (here: threads, each with its own AdapterStore on the root, so the file lock decides) starting
    together on a new store: the demo tasks are copied once, each at v1."""
    source = AdapterStore(tmp_path / "demo")
    for i, task in enumerate(["x", "y", "z"]):
        source.commit(task, cfg(i), weights(i))
    root = tmp_path / "shared"
    stores = [AdapterStore(root) for _ in range(4)]
    copied: list[list[str]] = []
    start = threading.Barrier(len(stores))

    def seed(store: AdapterStore) -> None:
        start.wait()
        copied.append(store.seed(tmp_path / "demo"))

    threads = [threading.Thread(target=seed, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(map(tuple, copied)) == [(), (), (), ("x", "y", "z")]
    assert {task: r.versions for task, r in AdapterStore(root).tasks().items()} == {"x": (1,), "y": (1,), "z": (1,)}
