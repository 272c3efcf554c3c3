"""Versioned, crash-safe on-disk store of task adapters.

Layout under ``root``::

    <root>/<task>/v<N>/adapter_config.json
    <root>/<task>/v<N>/adapter_model.safetensors
    <root>/<task>/state.json      {"current": N, "history": [..., N]}
    <root>/.tmp/                  staging uploads and retired tasks being deleted (emptied by recover())
    <root>/.lock                  inter-process lock file (fcntl.flock)
    <root>/.seeded                the store was initialised (see ``seed``)
    <root>/.generation            {"generation": N, "changes": [[N, task], ...]}: bumped by every change (see below)

The store deals only in files: it never parses the adapter contents, the caller validates them before committing.

Crash-safety invariants:

* A version directory only ever appears under its final name complete and fsynced: it is fully written in
  ``.tmp/`` and then ``os.rename``d into place.
* ``state.json`` is the single commit point. It is replaced atomically and only after the version it names is
  durable, so it never points at a missing or partial version.
* A retired task disappears in one ``os.rename`` (into ``.tmp/``) before anything is deleted.

Decisions:

* A complete version directory that ``state.json`` does not reference (a crash between the rename and the state
  update) is kept by ``recover()``: it is never served, but keeping it means a version number is never handed out
  twice within a task's life, so a cache keyed on ``(task, version)`` cannot confuse two different uploads.
* ``retire()`` removes the whole task directory, so a later ``commit()`` of the same name starts a fresh task at
  ``v1``. Anything caching adapters by ``(task, version)`` must drop a task's entries when it is retired.
* Every mutation, staging included, runs under both locks, so ``recover()`` in one replica can never delete
  another replica's upload in progress. Reads take no lock.

Faults (a read-only store, a full disk, any other OSError):

* A store that cannot be written at open (read-only file system, a directory or lock file this user may not
  write) still opens and serves what it holds: recovery is skipped with a warning, and every mutation raises
  ``StoreUnwritable`` until the store is writable again (checked at each attempt; recovery then runs first).
* A mutation that fails with an OSError raises ``StoreUnwritable`` naming the cause, after undoing itself under
  the lock: the staging dir is removed, a stray ``state.json.tmp`` is removed, and a version already renamed into
  place is taken out again. Since ``state.json`` never named that version nobody served it, so unlike a crash
  orphan it need not be kept, and removing it gives the space back on a full disk; its number may be reused.
* Once ``state.json`` has been replaced (or a retired task renamed away) the change is made: a failing directory
  fsync after that point is logged, not raised, because the caller must see what the disk shows. A power loss
  could then at worst bring back the previous state, which names versions still on disk, because pruning is
  skipped for that commit.

Replicas: several processes (server replicas, the CLI) may share one root on a file system with working ``flock``
and atomic ``rename`` (a local disk; NFSv4, whose locks are leases; a Kubernetes ReadWriteMany volume backed by
either). Each mutation ends by bumping ``.generation`` under the lock, which also journals the last
``CHANGES_KEPT`` changes by task; a replica polls that one small file (``changes_since``) and reads only the tasks
named since the generation it serves. A replica further behind than the journal compares every task's
``state.json`` stamp (``state_stamp``: inode, mtime, size; a replace always makes a new inode) instead.

Retention: with ``keep_versions=N`` each commit keeps the last N entries of history (the new current version and
the N - 1 rollback targets before it) and deletes every other version directory of the task, including versions
rolled back away from and crash orphans, so rollback can only ever land on a version that exists. The pruned
versions leave ``state.json`` (durably) before their directories are renamed into ``.tmp/`` and deleted. Pruning
runs only right after a commit, when the current version is the highest number, so numbering stays monotonic.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from lpt_serve.errors import NothingToRollBack, StoreError, StoreUnwritable, TaskNotFound
from lpt_serve.format import ADAPTER_FILES, CONFIG_NAME, TASK_NAME_PATTERN, WEIGHTS_NAME, validate_task_name

__all__ = [
    "STATE_NAME",
    "AdapterStore",
    "TaskRecord",
]

log = logging.getLogger(__name__)

STATE_NAME = "state.json"
STATE_TMP_NAME = "state.json.tmp"
TMP_DIR_NAME = ".tmp"
LOCK_NAME = ".lock"
# Written once the store has been initialised (seeded or not), so that retiring every demo task does not bring
# them back at the next start.
SEEDED_NAME = ".seeded"
GENERATION_NAME = ".generation"
# Changes the generation file remembers by task, so a replica a little behind reads only the tasks that changed.
CHANGES_KEPT = 512

T = TypeVar("T")

# No leading zeros: "v01" and "v1" would otherwise name the same version.
_VERSION_DIR = re.compile(r"v([1-9][0-9]*)")
_CHUNK = 1 << 20

# What an operator reads for the errors a store write usually meets: (what happened, what to do about it).
_FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("the disk is full", "free space on it"),
    errno.EDQUOT: ("the disk quota is used up", "free space or raise the quota"),
    errno.EROFS: ("the file system is read-only", "remount it read-write"),
    errno.EACCES: ("permission denied", "give the server's user write access to the store directory"),
    errno.EPERM: ("operation not permitted", "give the server's user write access to the store directory"),
    errno.EIO: ("an I/O error", "check the disk (the kernel log says more)"),
}


def _crash_hook(stage: str) -> None:
    """Test seam: called at each crash-relevant point of a mutation; tests replace it to block and get SIGKILLed.

    Stages: ``"write-weights"`` (after each chunk of the weights file), ``"staged"`` (staging dir durable, not yet
    renamed), ``"renamed"`` (version dir in place, state.json not yet updated), ``"state-replaced"``,
    ``"retire-renamed"`` (task moved into .tmp, not yet deleted).
    """


def _fault(exc: OSError) -> tuple[str, str]:
    """(what happened, naming the errno and path; what to do) for an OSError met while writing the store."""
    cause, fix = _FAULTS.get(exc.errno or 0, (exc.strerror or str(exc) or type(exc).__name__,
                                                   "check the store directory"))
    details = [errno.errorcode.get(exc.errno, "") if exc.errno else "", str(exc.filename or "")]
    detail = " on ".join(d for d in details if d)
    return (f"{cause} ({detail})" if detail else cause), fix


# (inode, mtime in ns, size) of a task's state.json: it changes with every commit, rollback or retire of the task.
Stamp = tuple[int, int, int]


@dataclass(frozen=True)
class TaskRecord:
    task: str
    current: int
    versions: tuple[int, ...]
    history: tuple[int, ...]
    task_dir: Path = field(repr=False)

    def path(self, version: int | None = None) -> Path:
        """Directory of ``version`` (default: the current one)."""
        v = self.current if version is None else version
        if v not in self.versions:
            raise ValueError(f"task {self.task!r} has no version {v} (has {list(self.versions)})")
        return self.task_dir / f"v{v}"


@dataclass(frozen=True)
class ScannedTask:
    task: str
    stamp: Stamp | None
    record: TaskRecord | None
    error: StoreError | None  # state.json is there but unreadable


def _open_lock_file(path: Path) -> int:
    # A seam too: tests make it raise EROFS/EACCES to play a read-only store without mounting one.
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    # A failed write() or fsync() names no file; the operator needs to know which file system is full.
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def _write_durably(path: Path, chunks: Iterable[bytes | memoryview], stage: str | None = None) -> None:
    # "xb": a staging path is always fresh, so an existing file means something else is writing there.
    with _naming(path), open(path, "xb") as f:
        for chunk in chunks:
            f.write(chunk)
            if stage is not None:
                _crash_hook(stage)
        f.flush()
        os.fsync(f.fileno())


def _write_durably_replace(path: Path, data: bytes) -> None:
    """Atomically replace ``path``; when this raises, ``path`` is untouched and no ``.tmp`` sibling is left."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with _naming(tmp), open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _required(task: str, read: Callable[[], T | None]) -> T:
    """What `read` finds of `task`; TaskNotFound when it finds nothing, or the task's state is unreadable."""
    try:
        found = read()
    except StoreError as e:
        raise TaskNotFound(f"task {task!r} is not servable: {e}") from e
    if found is None:
        raise TaskNotFound(f"task {task!r} not found")
    return found


def _bytes_chunks(data: bytes) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        yield view[start : start + _CHUNK]


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            yield chunk


# What pathlib's is_file/is_dir take for "no": the entry is missing, a path component is not a directory, or a link
# loops. Anything else (EIO, ESTALE on NFS, EACCES) is raised: read as "no", recovery would delete a complete version.
_ABSENT_ERRNOS = (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP)


def _is_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError as e:
        if e.errno in _ABSENT_ERRNOS:
            return False
        raise


def _is_dir_entry(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError as e:
        if e.errno in _ABSENT_ERRNOS:
            return False
        raise


def _is_complete(version_dir: str | Path) -> bool:
    # On strings joined with "/" (the store is POSIX-only: it locks with fcntl), not pathlib or os.path.join: a
    # server starting on 10,000 tasks runs this for every version of every task, and building paths was most of it.
    return _is_file(f"{version_dir}/{CONFIG_NAME}") and _is_file(f"{version_dir}/{WEIGHTS_NAME}")


def _parse_state(raw: bytes) -> tuple[int, tuple[int, ...]]:
    data = json.loads(raw)
    current = data["current"]
    history = data.get("history") or []
    # bool is an int subclass; true/false in state.json is corruption, not version 1/0.
    if type(current) is not int or current < 1:
        raise ValueError(f"bad current {current!r}")
    if not isinstance(history, list) or any(type(v) is not int or v < 1 for v in history):
        raise ValueError(f"bad history {history!r}")
    if not history or history[-1] != current:
        history = [*history, current]
    return current, tuple(history)


class AdapterStore:
    def __init__(self, root: Path | str, *, keep_versions: int | None = None, recover: bool = True):
        """Open (creating it if needed) the store at ``root`` and recover from crashes, or open it read-only when
        it cannot be written (see "Faults" above). ``keep_versions``: versions kept per task after each commit,
        the current one included (None keeps them all). ``recover=False`` leaves recovery to a later
        ``recover_at_open()`` (a server runs it on a thread, while it already serves: recovery holds the store's
        lock, so a change waits for it, and it removes nothing a reader could be reading)."""
        if keep_versions is not None and (type(keep_versions) is not int or keep_versions < 1):
            raise ValueError(f"keep_versions must be None or at least 1, got {keep_versions!r}")
        self._locate(root, keep_versions, always_read_only=False)
        self.make_root(self.root)
        self._unwritable: tuple[str, str] | None = self._why_unwritable()
        if self._unwritable is not None:
            cause, fix = self._unwritable
            log.warning("adapter store %s is read-only: %s. Serving what it holds without recovery; uploads, "
                        "rollbacks and retires fail until you %s", self.root, cause, fix)
        elif recover:
            self.recover_at_open()

    @staticmethod
    def make_root(root: Path) -> None:
        """Create the store directory (with its parents) if it is missing, or say in one sentence why not."""
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            cause, fix = _fault(e)
            raise StoreUnwritable(f"cannot create the store directory {root}: {cause}; {fix}, or point the "
                                  "server at an existing store") from e

    @classmethod
    def read_only(cls, root: Path) -> AdapterStore:
        """A store object for reading only: no recovery, no lock, nothing written (the shipped seed data)."""
        store = cls.__new__(cls)
        store._locate(root, None, always_read_only=True)
        store._unwritable = ("it was opened with AdapterStore.read_only", "open it with AdapterStore(root)")
        return store

    def _locate(self, root: Path | str, keep_versions: int | None, *, always_read_only: bool) -> None:
        self.root = Path(root).resolve()
        self.keep_versions = keep_versions
        self._tmp = self.root / TMP_DIR_NAME
        self._lock_path = self.root / LOCK_NAME
        self._thread_lock = threading.Lock()
        self._holder = threading.local()  # this thread's lock depth (see _locked)
        self._always_read_only = always_read_only

    @property
    def read_only_reason(self) -> str | None:
        """Why the store took no changes when last checked (at open or at the last failed attempt), or None."""
        return None if self._unwritable is None else self._unwritable[0]

    def recover_at_open(self) -> None:
        """`recover`, as opening a store runs it: what it removed is logged, and a store found unwritable (now or
        meanwhile) is left for a later recovery with a warning."""
        if self._unwritable is not None:
            return
        try:
            removed = self.recover()
        except StoreUnwritable as e:
            # What is left in .tmp is invisible to readers, so serving can go on; a later recovery finishes it.
            log.warning("adapter store %s: recovery did not finish: %s", self.root, e.message)
            return
        if removed:
            log.info("adapter store %s: recovery removed %s", self.root, removed)

    # ---- locking and faults ----------------------------------------------------------------------------------

    def _why_unwritable(self) -> tuple[str, str] | None:
        """(cause, fix) when this process cannot change the store now, else None. Root passes os.access on a
        0o555 directory, so a read-only mount is asked of statvfs and the lock file is actually opened."""
        try:
            if os.statvfs(self.root).f_flag & os.ST_RDONLY:
                return _fault(OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.root)))
        except OSError:
            pass  # statvfs is only the quick answer; the checks below decide
        if not os.access(self.root, os.W_OK | os.X_OK):
            return _fault(OSError(errno.EACCES, os.strerror(errno.EACCES), str(self.root)))
        try:
            os.close(_open_lock_file(self._lock_path))
        except OSError as e:
            return _fault(e)
        return None

    def _ensure_writable(self, action: str) -> None:
        if self._unwritable is not None and not self._always_read_only:
            # Checked again at each attempt, so remounting read-write is enough: no restart needed.
            self._unwritable = self._why_unwritable()
            if self._unwritable is None:
                log.warning("adapter store %s is writable again", self.root)
                self.recover_at_open()
        if self._unwritable is not None:
            cause, fix = self._unwritable
            raise StoreUnwritable(f"cannot {action}: the store {self.root} is read-only: {cause}; {fix}, then "
                                  "retry. What it holds still serves.")

    @contextlib.contextmanager
    def _changing(self, action: str) -> Iterator[None]:
        """Both locks for one mutation; any OSError inside becomes StoreUnwritable naming its cause. The mutation
        must have undone itself by then (see ``_commit``)."""
        self._ensure_writable(action)
        try:
            with self._locked():
                yield
        except OSError as e:
            cause, fix = _fault(e)
            raise StoreUnwritable(f"cannot {action}: {cause}; {fix}, then retry. The store still serves what it "
                                  "held before.") from e

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # The thread lock comes first so threads of this process queue on it rather than on flock; flock then
        # serialises against other processes (server replicas, the CLI) sharing the root. The lock file is opened
        # per acquisition so a store object holds no fd between mutations, and the kernel drops the lock if the
        # holder dies.
        # Re-entrant within a thread (seeding commits under its own lock): a second flock on a new descriptor of
        # the same file would wait for ourselves.
        if getattr(self._holder, "depth", 0):
            self._holder.depth += 1
            try:
                yield
            finally:
                self._holder.depth -= 1
            return
        with self._thread_lock:
            fd = _open_lock_file(self._lock_path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._holder.depth = 1
                try:
                    yield
                finally:
                    self._holder.depth = 0
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    # ---- reading -------------------------------------------------------------------------------------------

    def _task_dir(self, task: str) -> Path:
        return self.root / validate_task_name(task)

    @staticmethod
    def _version_numbers(task_dir: str | Path) -> list[int]:
        """Every ``v<N>`` directory name present, complete or not (so numbering never collides with either)."""
        found = []
        with os.scandir(task_dir) as entries:  # the directory's own entry types: no stat per entry
            for entry in entries:
                m = _VERSION_DIR.fullmatch(entry.name)
                if m and _is_dir_entry(entry):
                    found.append(int(m.group(1)))
        return sorted(found)

    def _complete_versions(self, task_dir: str | Path) -> tuple[int, ...]:
        base = os.fspath(task_dir)
        return tuple(v for v in self._version_numbers(task_dir) if _is_complete(f"{base}/v{v}"))

    @staticmethod
    def _read_state(task_dir: str | Path) -> tuple[int, tuple[int, ...]] | None:
        """(current, history), or None when the task has no state.json (never made current, or gone)."""
        stamped = AdapterStore._read_stamped_state(os.fspath(task_dir))
        return None if stamped is None else stamped[1]

    @staticmethod
    def _read_stamped_state(task_dir: str) -> tuple[Stamp, tuple[int, tuple[int, ...]]] | None:
        """The stamp of state.json with what it says, both from one open file: state.json is only ever replaced
        by a rename, so the two always belong together. None when the task has no state.json."""
        path = f"{task_dir}/{STATE_NAME}"
        try:
            with open(path, "rb") as file:
                st = os.fstat(file.fileno())
                raw = file.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            return (st.st_ino, st.st_mtime_ns, st.st_size), _parse_state(raw)
        except (ValueError, KeyError, TypeError) as e:
            # os.replace means we never produce this ourselves; someone edited the file by hand.
            raise StoreError(f"corrupt {path}: {e}") from e

    def _load(self, task: str) -> TaskRecord | None:
        """The served record of ``task``, or None when it is absent or has no complete current version."""
        return self._load_stamped(task)[1]

    def _load_stamped(self, task: str) -> tuple[Stamp | None, TaskRecord | None]:
        # On strings, not pathlib: a server starting on 10,000 tasks runs this for each, and building Path objects
        # was a third of that time.
        task_dir = f"{self.root}/{validate_task_name(task)}"
        try:
            stamped = self._read_stamped_state(task_dir)
            if stamped is None:
                return None, None
            versions = self._complete_versions(task_dir)
        except FileNotFoundError:
            # Retired (renamed away) between our reads.
            return None, None
        stamp, (current, history) = stamped
        if current not in versions:
            log.warning("task %r: state.json names v%d, which is not a complete version; not serving", task, current)
            return stamp, None
        return stamp, TaskRecord(task=task, current=current, versions=versions, history=history,
                                 task_dir=Path(task_dir))

    def scan(self) -> Iterator[ScannedTask]:
        """Every task directory, sorted: its state.json stamp and its served record (None when not servable), or
        why its state cannot be read. One open, one listing and a stat per file of each version, per task:
        what a server reads at start. Lock-free."""
        for task in self._task_names():
            try:
                stamp, record = self._load_stamped(task)
            except StoreError as e:
                yield ScannedTask(task, self.state_stamp(task), None, e)
                continue
            except OSError as e:  # one unreadable task (permissions, I/O) must not keep the others from serving
                yield ScannedTask(task, None, None, StoreError(f"cannot read task {task!r}: {e}"))
                continue
            yield ScannedTask(task, stamp, record, None)

    def _task_names(self) -> list[str]:
        names = []
        with os.scandir(self.root) as entries:
            for entry in entries:
                # Task names cannot start with a dot, so .tmp, .lock and .seeded never look like tasks.
                if TASK_NAME_PATTERN.fullmatch(entry.name) and _is_dir_entry(entry):
                    names.append(entry.name)
        return sorted(names)

    def tasks(self) -> dict[str, TaskRecord]:
        """Served tasks (state.json names a complete version), sorted by name. Lock-free."""
        out: dict[str, TaskRecord] = {}
        for name in self._task_names():
            try:
                record = self._load(name)
            except StoreError as e:
                log.warning("skipping task %r: %s", name, e)
                continue
            if record is not None:
                out[name] = record
        return out

    def get(self, task: str) -> TaskRecord:
        """The served record of ``task``; raises TaskNotFound when it is absent or not servable. Lock-free."""
        return _required(task, lambda: self._load(task))

    def record(self, task: str) -> TaskRecord | None:
        """As ``get``, None when the task is absent or not servable; StoreError when its state is unreadable."""
        return self._load(task)

    def task_names(self) -> list[str]:
        """Names of the task directories present (servable or not), sorted. Lock-free."""
        return self._task_names()

    def state_stamp(self, task: str) -> Stamp | None:
        """(inode, mtime in ns, size) of the task's state.json, or None without one: it changes with every commit,
        rollback or retire of the task, because state.json is only ever replaced by a rename. Lock-free, one stat."""
        try:
            st = os.stat(self._task_dir(task) / STATE_NAME)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _read_generation(self) -> tuple[int, tuple[tuple[int, str], ...]]:
        """(generation, the last changes as (generation, task) pairs, oldest first). Opening the file, not just
        stat-ing it, is what an NFS client revalidates (close-to-open consistency)."""
        try:
            data = json.loads((self.root / GENERATION_NAME).read_bytes())
            generation = int(data["generation"])
            changes = tuple((int(g), str(t)) for g, t in data.get("changes", ()))
        except (OSError, ValueError, KeyError, TypeError):
            return 0, ()
        return generation, changes

    def generation(self) -> int:
        """The store's change counter: every commit, rollback and retire, by any process, bumps it under the lock.
        0 for a store never changed (or whose counter is unreadable, which the next change repairs). Lock-free."""
        return self._read_generation()[0]

    def changes_since(self, generation: int) -> tuple[int, list[str] | None]:
        """(the current generation, the tasks changed after ``generation``), from the journal the generation file
        keeps of its last ``CHANGES_KEPT`` changes; None for the tasks when ``generation`` is older than that (or
        the file is unreadable): then the caller must compare every task. Lock-free, one small file read."""
        current, changes = self._read_generation()
        if current == generation:
            return current, []
        if current < generation or not changes or changes[0][0] > generation + 1:
            return current, None
        return current, list(dict.fromkeys(task for g, task in changes if g > generation))

    def _bump_generation(self, task: str) -> None:
        # Under the lock, after the change is made: a failure here must not report the change as failed, so it is
        # logged; replicas still see the change at their periodic full comparison.
        generation, changes = self._read_generation()
        generation += 1
        journal = [*changes, (generation, task)][-CHANGES_KEPT:]
        payload = json.dumps({"generation": generation, "changes": journal}).encode()
        try:
            _write_durably_replace(self.root / GENERATION_NAME, payload)
        except OSError as e:
            log.error("store %s: the change is made but the generation file could not be bumped: %s", self.root, e)

    # ---- mutating ------------------------------------------------------------------------------------------

    def recover(self) -> list[str]:
        """Clean up after crashes; returns the removed paths, relative to the root, for logging.

        Removes everything under ``.tmp/`` (uploads that never got renamed, retired tasks not fully deleted),
        stray ``state.json.tmp`` files, and version directories that are incomplete and not referenced by
        state.json. Complete unreferenced versions are kept (see module docstring).
        """
        removed: list[str] = []
        with self._changing("recover the store"):
            if self._tmp.is_dir():
                for entry in sorted(self._tmp.iterdir()):
                    self._remove(entry)
                    removed.append(str(entry.relative_to(self.root)))
            self._tmp.mkdir(exist_ok=True)
            # Every task is visited at each start: one unlink attempt, one read, one listing and a stat per file
            # of each version, on string paths (a store of 10,000 tasks recovers in well under a second).
            for name in self._task_names():
                task_dir = f"{self.root}/{name}"
                try:
                    os.unlink(f"{task_dir}/{STATE_TMP_NAME}")
                    removed.append(f"{name}/{STATE_TMP_NAME}")
                except FileNotFoundError:
                    pass
                try:
                    state = self._read_state(task_dir)
                except StoreError as e:
                    # Without a readable state we cannot tell what is referenced, so leave it all for a human.
                    log.warning("recover: leaving task %r alone: %s", name, e)
                    continue
                referenced = set(state[1]) if state else set()
                for v in self._version_numbers(task_dir):
                    version_dir = f"{task_dir}/v{v}"
                    if v not in referenced and not _is_complete(version_dir):
                        self._remove(Path(version_dir))
                        removed.append(f"{name}/v{v}")
                    elif v in referenced and not _is_complete(version_dir):
                        log.warning("recover: task %r references incomplete v%d; keeping it", name, v)
        return removed

    def seed(self, source: Path) -> list[str]:
        """Copy the current version of every task in ``source`` (a store laid out as above, e.g. the demo adapters)
        into this store, once in its life: only when it holds no task and was never seeded. Returns the tasks
        copied. Later starts do nothing, so retiring a seeded task keeps it retired. A store that cannot be
        written is not seeded (a warning says why): serving what it holds matters more than the demo tasks."""
        marker = self.root / SEEDED_NAME
        if marker.exists():
            return []
        copied: list[str] = []
        empty = True
        try:
            # Checked and done under the lock: replicas starting together on a new store seed it once between them.
            with self._changing("seed the store"):
                if marker.exists():
                    return []
                empty = not self.tasks()
                if empty:
                    for task, record in AdapterStore.read_only(source).tasks().items():
                        self.commit_dir(task, record.path())
                        copied.append(task)
                _write_durably_replace(marker, b"")
        except StoreUnwritable as e:
            if empty:
                log.warning("not seeding the store %s with the demo tasks (copied: %s): %s", self.root,
                            ", ".join(copied) or "none", e.message)
            else:
                log.info("store %s: %s", self.root, e.message)
        return copied

    @staticmethod
    def _remove(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()

    def commit(self, task: str, config_bytes: bytes, weights_bytes: bytes) -> TaskRecord:
        """Store a new version of ``task`` (created if absent) and make it current."""
        validate_task_name(task)
        for label, data in (("config_bytes", config_bytes), ("weights_bytes", weights_bytes)):
            if not isinstance(data, bytes | bytearray | memoryview):
                raise TypeError(f"{label} must be bytes, got {type(data).__name__}")
        return self._commit(task, _bytes_chunks(bytes(config_bytes)), _bytes_chunks(bytes(weights_bytes)))

    def commit_dir(self, task: str, src_dir: Path) -> TaskRecord:
        """Copy the two adapter files of ``src_dir`` in as a new current version; other files there are ignored."""
        validate_task_name(task)
        src_dir = Path(src_dir)
        missing = [name for name in ADAPTER_FILES if not (src_dir / name).is_file()]
        if missing:
            raise StoreError(f"{src_dir} is not an adapter directory: missing {', '.join(missing)}")
        return self._commit(task, _file_chunks(src_dir / CONFIG_NAME), _file_chunks(src_dir / WEIGHTS_NAME))

    def _commit(
        self, task: str, config_chunks: Iterable[bytes | memoryview], weights_chunks: Iterable[bytes | memoryview]
    ) -> TaskRecord:
        with self._changing(f"store a new version of {task!r}"):
            task_dir = self.root / task
            try:
                prior = self._read_state(task_dir)
            except StoreError as e:
                # Committing is how an operator fixes a broken task, so start a fresh history rather than refuse.
                log.warning("task %r: %s; starting a new history", task, e)
                prior = None

            self._tmp.mkdir(exist_ok=True)
            staging = self._tmp / f"stage-{task}-{uuid.uuid4().hex}"
            made_task_dir = False
            final: Path | None = None
            try:
                staging.mkdir()
                _write_durably(staging / CONFIG_NAME, config_chunks)
                _write_durably(staging / WEIGHTS_NAME, weights_chunks, stage="write-weights")
                _fsync_dir(staging)
                _crash_hook("staged")

                if not task_dir.is_dir():
                    task_dir.mkdir()
                    made_task_dir = True
                    _fsync_dir(self.root)
                version = max(self._version_numbers(task_dir), default=0) + 1
                os.rename(staging, task_dir / f"v{version}")
                final = task_dir / f"v{version}"
                # Make the rename durable before state.json can name the new version.
                _fsync_dir(task_dir)
                _fsync_dir(self._tmp)
                _crash_hook("renamed")

                history = (*(prior[1] if prior else ()), version)
                if self.keep_versions is not None:
                    history = history[-self.keep_versions :]
                # The commit point: raising here means state.json is untouched (see _write_state).
                durable = self._write_state(task_dir, version, history)
            except BaseException:
                self._undo_commit(staging, final, task_dir if made_task_dir else None)
                raise
            _crash_hook("state-replaced")
            if self.keep_versions is not None and durable:
                self._prune(task_dir, history)
            self._bump_generation(task)
            return TaskRecord(
                task=task,
                current=version,
                versions=self._complete_versions(task_dir),
                history=history,
                task_dir=task_dir,
            )

    def _undo_commit(self, staging: Path, final: Path | None, new_task_dir: Path | None) -> None:
        """Take a failed commit back out (under the lock): nothing of it may stay visible or hold space."""
        shutil.rmtree(staging, ignore_errors=True)
        if final is not None:
            # An interruption right after state.json was replaced leaves the version committed: it must stay.
            try:
                state = self._read_state(final.parent)
                committed = state is not None and final.name == f"v{state[0]}"
            except (StoreError, OSError):
                committed = True  # cannot tell; an unserved orphan is harmless, a dangling state.json is not
            if committed:
                final = None
        if final is not None:
            trash = self._tmp / f"failed-{final.parent.name}-{final.name}-{uuid.uuid4().hex}"
            try:
                # One rename makes it vanish from the task; the deletion may then take its time or fail.
                os.rename(final, trash)
            except OSError as e:
                log.error("could not take the failed upload %s back out: %s; it stays as an unserved orphan",
                          final, e)
            else:
                shutil.rmtree(trash, ignore_errors=True)
        if new_task_dir is not None:
            with contextlib.suppress(OSError):
                new_task_dir.rmdir()  # only succeeds when empty, which it is once the version is out

    def _prune(self, task_dir: Path, keep: tuple[int, ...]) -> list[int]:
        """Delete every version directory of ``task_dir`` not in ``keep``, the history that state.json now names
        durably. Failures are logged: the commit is made, and the next commit (or recover) tries again."""
        pruned: list[int] = []
        for v in self._version_numbers(task_dir):
            if v in keep:
                continue
            trash = self._tmp / f"pruned-{task_dir.name}-v{v}-{uuid.uuid4().hex}"
            try:
                os.rename(task_dir / f"v{v}", trash)
            except OSError as e:
                log.warning("task %r: could not prune v%d: %s", task_dir.name, v, e)
                continue
            pruned.append(v)
            try:
                shutil.rmtree(trash)
            except OSError as e:
                log.warning("task %r: pruned v%d but could not delete %s yet: %s", task_dir.name, v, trash, e)
        if pruned:
            with contextlib.suppress(OSError):
                _fsync_dir(task_dir)
            log.info("task %r: pruned versions %s (keeping %s)", task_dir.name, pruned, list(keep))
        return pruned

    @staticmethod
    def _write_state(task_dir: Path, current: int, history: tuple[int, ...]) -> bool:
        """Replace state.json; True when the change is also durable. When this raises, state.json is untouched
        and no state.json.tmp is left. After the replace the change is made and visible, so a failing directory
        fsync is only logged (False): a power loss may bring back the previous state, never a broken one."""
        payload = json.dumps({"current": current, "history": list(history)}).encode()
        _write_durably_replace(task_dir / STATE_NAME, payload)
        try:
            _fsync_dir(task_dir)
        except OSError as e:
            log.error("task %r: state.json replaced but the directory fsync failed: %s", task_dir.name, e)
            return False
        return True

    def retire(self, task: str) -> None:
        """Stop serving ``task`` and delete all its versions; TaskNotFound if there is no such task directory.

        A task directory without a servable version (e.g. only an orphan upload) can be retired too, to clean it up.
        """
        task_dir = self._task_dir(task)
        with self._changing(f"retire {task!r}"):
            if not task_dir.is_dir():
                raise TaskNotFound(f"task {task!r} not found")
            self._tmp.mkdir(exist_ok=True)
            graveyard = self._tmp / f"retired-{task}-{uuid.uuid4().hex}"
            os.rename(task_dir, graveyard)
            # The task is gone from view from here on, so nothing below may report the retire as failed.
            try:
                _fsync_dir(self.root)
                _fsync_dir(self._tmp)
            except OSError as e:
                log.error("retire %r: the task is gone but the directory fsync failed: %s", task, e)
            self._bump_generation(task)
            _crash_hook("retire-renamed")
            try:
                shutil.rmtree(graveyard)
            except OSError as e:
                # recover() at the next open finishes the deletion.
                log.warning("retire %r: could not delete %s yet: %s", task, graveyard, e)

    def rollback(self, task: str) -> TaskRecord:
        """Make the previous version in history current again; NothingToRollBack if there is none."""
        task_dir = self._task_dir(task)
        with self._changing(f"roll back {task!r}"):
            _, history = _required(task, lambda: self._read_state(task_dir))
            complete = set(self._complete_versions(task_dir))
            remaining = list(history[:-1])
            # Only land on a version that can actually be served; should never skip anything in practice.
            while remaining and remaining[-1] not in complete:
                log.warning("rollback %r: skipping incomplete v%d", task, remaining.pop())
            if not remaining:
                raise NothingToRollBack(f"task {task!r} has no earlier version to roll back to")
            target = remaining[-1]
            self._write_state(task_dir, target, tuple(remaining))
            self._bump_generation(task)
            return TaskRecord(
                task=task,
                current=target,
                versions=tuple(sorted(complete)),
                history=tuple(remaining),
                task_dir=task_dir,
            )
