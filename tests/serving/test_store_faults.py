"""Store faults: a read-only store, a full disk and other OSErrors are named (StoreUnwritable, 507 at the edge) and
survivable (the previous version keeps serving, nothing half-written stays visible); retention of old versions.

Each fault is played twice where possible: deterministically, by making the store's own write seams raise, and for
real, on a small tmpfs (needs root and CAP_SYS_ADMIN; skipped with the reason otherwise)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from lpt_serve.errors import NothingToRollBack, StoreUnwritable
from lpt_serve.format import CONFIG_NAME, WEIGHTS_NAME
from lpt_serve.serving import store as store_mod
from lpt_serve.serving.registry import Registry
from lpt_serve.serving.store import AdapterStore
from tests.helpers import ADMIN_TOKEN, adapter_files, make_adapter, serving


def cfg(n: int) -> bytes:
    return json.dumps({"n": n}).encode()


def weights(n: int, size: int = 1000) -> bytes:
    return bytes([n % 256]) * size


def oserror(code: int, path: Path | str) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def raising(code: int):
    """A stand-in for a store seam (or os function) that fails on the path it is given first."""

    def fail(path, *args, **kwargs):
        raise oserror(code, path)

    return fail


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (dot entries included) with the bytes of files: equal snapshots, unchanged store."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def two_versions(root: Path, **kwargs) -> AdapterStore:
    s = AdapterStore(root, **kwargs)
    s.commit("t", cfg(1), weights(1))
    s.commit("t", cfg(2), weights(2))
    return s


# ---- a full disk (or another OSError) during a mutation, played through the write seams -----------------------


@pytest.mark.parametrize(
    ("code", "named"),
    [(errno.ENOSPC, "the disk is full (ENOSPC"), (errno.EDQUOT, "quota is used up (EDQUOT"),
     (errno.EIO, "an I/O error (EIO")],
)
def test_failed_upload_is_named_and_leaves_the_store_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, named: str
) -> None:
    s = two_versions(tmp_path)
    before = snapshot(tmp_path)

    def fail(path: Path, chunks, stage=None) -> None:
        path.write_bytes(b"half")  # something really is half-written when the error comes
        raise oserror(code, path)

    monkeypatch.setattr(store_mod, "_write_durably", fail)
    with pytest.raises(StoreUnwritable) as caught:
        s.commit("t", cfg(3), weights(3))
    message = caught.value.message
    assert named in message and "store a new version of 't'" in message and "still serves" in message
    assert snapshot(tmp_path) == before
    assert s.get("t").current == 2
    monkeypatch.undo()
    assert s.commit("t", cfg(3), weights(3)).current == 3


def test_failed_upload_of_a_new_task_leaves_no_task_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = two_versions(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(store_mod, "_write_durably", raising(errno.ENOSPC))
    with pytest.raises(StoreUnwritable, match="disk is full"):
        s.commit("fresh", cfg(1), weights(1))
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "fresh").exists()


def test_failure_at_the_commit_point_takes_the_renamed_version_back_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The new version is already renamed into place, and state.json.tmp written, when the replace fails.
    s = two_versions(tmp_path)
    before = snapshot(tmp_path)

    def replace_fails(src, dst) -> None:
        assert (tmp_path / "t" / "v3" / WEIGHTS_NAME).is_file() and Path(src).is_file()
        raise oserror(errno.EIO, dst)

    monkeypatch.setattr(store_mod.os, "replace", replace_fails)
    with pytest.raises(StoreUnwritable, match=r"an I/O error \(EIO on .*state\.json"):
        s.commit("t", cfg(3), weights(3))
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # no v3, no state.json.tmp, state.json as it was
    # v3 was never named by state.json, so its number is free again (documented).
    r = s.commit("t", cfg(3), weights(3))
    assert (r.current, r.history, r.versions) == (3, (1, 2, 3), (1, 2, 3))


def test_failed_rollback_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = two_versions(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(store_mod, "_write_durably_replace", raising(errno.ENOSPC))
    with pytest.raises(StoreUnwritable, match="cannot roll back 't': the disk is full"):
        s.rollback("t")
    assert snapshot(tmp_path) == before
    assert s.get("t").current == 2


def test_failed_retire_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = two_versions(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(store_mod.os, "rename", raising(errno.EIO))
    with pytest.raises(StoreUnwritable, match="cannot retire 't': an I/O error"):
        s.retire("t")
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert s.get("t").current == 2


# ---- a read-only store, played through the lock-file seam -----------------------------------------------------


def test_read_only_store_opens_serves_and_refuses_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    two_versions(tmp_path)
    leftover = tmp_path / ".tmp" / "stage-t-left-by-a-crash"
    leftover.mkdir()
    before = snapshot(tmp_path)
    monkeypatch.setattr(store_mod, "_open_lock_file", raising(errno.EROFS))
    with caplog.at_level(logging.WARNING, logger=store_mod.__name__):
        s = AdapterStore(tmp_path)
    assert "is read-only" in caplog.text and "without recovery" in caplog.text
    assert s.read_only_reason is not None and "EROFS" in s.read_only_reason
    assert s.get("t").current == 2 and list(s.tasks()) == ["t"]
    for change in (lambda: s.commit("t", cfg(3), weights(3)), lambda: s.rollback("t"), lambda: s.retire("t"),
                   s.recover):
        with pytest.raises(StoreUnwritable, match=r"is read-only: the file system is read-only \(EROFS.*remount it"):
            change()
    assert s.seed(tmp_path) == []
    assert snapshot(tmp_path) == before  # recovery was skipped: even the crash leftover is still there

    # Made writable again: the next change recovers first, then goes through, with no restart.
    monkeypatch.undo()
    assert s.commit("t", cfg(3), weights(3)).current == 3
    assert s.read_only_reason is None
    assert entries(tmp_path / ".tmp") == []


def test_read_only_directory(tmp_path: Path) -> None:
    root = tmp_path / "store"
    two_versions(root)
    before = snapshot(root)
    root.chmod(0o555)
    try:
        try:
            (root / "probe").mkdir()
        except PermissionError:
            pass
        else:
            pytest.skip("this user writes through a 0o555 directory (root with CAP_DAC_OVERRIDE); "
                        "test_real_read_only_remount plays a read-only store for root")
        s = AdapterStore(root)
        assert s.read_only_reason is not None and "permission denied (EACCES" in s.read_only_reason
        assert s.get("t").current == 2
        with pytest.raises(StoreUnwritable, match="give the server's user write access"):
            s.commit("t", cfg(3), weights(3))
        assert snapshot(root) == before
    finally:
        root.chmod(0o755)
    assert s.commit("t", cfg(3), weights(3)).current == 3


def test_seeding_a_read_only_store_is_skipped_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    AdapterStore(tmp_path / "seed").commit("demo", cfg(1), weights(1))
    (tmp_path / "store").mkdir()
    monkeypatch.setattr(store_mod, "_open_lock_file", raising(errno.EACCES))
    s = AdapterStore(tmp_path / "store")
    with caplog.at_level(logging.WARNING, logger=store_mod.__name__):
        assert s.seed(tmp_path / "seed") == []
    assert "not seeding" in caplog.text and "permission denied (EACCES" in caplog.text
    assert entries(tmp_path / "store") == [] and s.tasks() == {}


def test_a_store_that_cannot_be_created_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "mkdir", raising(errno.EACCES))
    with pytest.raises(StoreUnwritable, match="cannot create the store directory .*permission denied"):
        AdapterStore(tmp_path / "nope")


# ---- retention ------------------------------------------------------------------------------------------------


def version_dirs(task_dir: Path) -> list[str]:
    return sorted((p.name for p in task_dir.iterdir() if p.name.startswith("v")), key=lambda n: int(n[1:]))


def test_twenty_uploads_keep_the_last_five(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path, keep_versions=5)
    for n in range(1, 21):
        r = s.commit("t", cfg(n), weights(n))
    assert (r.current, r.history, r.versions) == (20, (16, 17, 18, 19, 20), (16, 17, 18, 19, 20))
    assert version_dirs(tmp_path / "t") == ["v16", "v17", "v18", "v19", "v20"]
    assert json.loads((tmp_path / "t" / "state.json").read_text()) == {"current": 20, "history": [16, 17, 18, 19, 20]}
    assert entries(tmp_path / ".tmp") == []
    for expected in (19, 18, 17, 16):
        r = s.rollback("t")
        assert r.current == expected
        assert (r.path() / CONFIG_NAME).read_bytes() == cfg(expected)
    with pytest.raises(NothingToRollBack):
        s.rollback("t")
    assert s.get("t").current == 16
    # Numbering goes on past every pruned version.
    assert s.commit("t", cfg(21), weights(21)).current == 21


def test_retention_drops_versions_rollback_can_no_longer_reach(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path, keep_versions=3)
    for n in (1, 2, 3):
        s.commit("t", cfg(n), weights(n))
    assert s.rollback("t").current == 2  # v3 is off the history now, and never reachable again
    orphan = tmp_path / "t" / "v4"  # a crash between rename and state update left a complete orphan
    orphan.mkdir()
    (orphan / CONFIG_NAME).write_bytes(cfg(4))
    (orphan / WEIGHTS_NAME).write_bytes(weights(4))
    r = s.commit("t", cfg(5), weights(5))
    assert (r.current, r.history, r.versions) == (5, (1, 2, 5), (1, 2, 5))
    assert version_dirs(tmp_path / "t") == ["v1", "v2", "v5"]


def test_retention_of_one_keeps_only_the_current_version(tmp_path: Path) -> None:
    s = two_versions(tmp_path, keep_versions=1)
    assert version_dirs(tmp_path / "t") == ["v2"]
    with pytest.raises(NothingToRollBack):
        s.rollback("t")


def test_no_retention_keeps_everything(tmp_path: Path) -> None:
    s = AdapterStore(tmp_path)
    for n in range(1, 8):
        s.commit("t", cfg(n), weights(n))
    assert s.get("t").versions == tuple(range(1, 8))


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_bad_retention_refused(tmp_path: Path, bad) -> None:
    with pytest.raises(ValueError, match="keep_versions"):
        AdapterStore(tmp_path, keep_versions=bad)


def test_no_pruning_when_the_new_state_may_not_be_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # If state.json's directory fsync fails, a power loss could bring back the old state.json; the versions it
    # names must then still exist.
    s = two_versions(tmp_path, keep_versions=2)
    real_replace, real_fsync = store_mod._write_durably_replace, store_mod._fsync_dir
    replaced: list[Path] = []

    def replace(path: Path, data: bytes) -> None:
        real_replace(path, data)
        replaced.append(path)

    def fsync_dir(path: Path) -> None:
        if replaced:
            raise oserror(errno.EIO, path)
        real_fsync(path)

    monkeypatch.setattr(store_mod, "_write_durably_replace", replace)
    monkeypatch.setattr(store_mod, "_fsync_dir", fsync_dir)
    r = s.commit("t", cfg(3), weights(3))
    assert (r.current, r.history) == (3, (2, 3))  # the change is made: the caller must see what the disk shows
    assert version_dirs(tmp_path / "t") == ["v1", "v2", "v3"]
    monkeypatch.undo()
    s.commit("t", cfg(4), weights(4))
    assert version_dirs(tmp_path / "t") == ["v3", "v4"]


def test_service_settings_carry_the_retention(tmp_path: Path) -> None:
    assert Settings(store=tmp_path).service_config().keep_versions == 5
    assert Settings(store=tmp_path, keep_versions=2).service_config().keep_versions == 2
    assert Settings(store=tmp_path, keep_versions=0).service_config().keep_versions is None


# ---- the registry and the edge --------------------------------------------------------------------------------


def test_registry_keeps_serving_the_old_version_when_the_store_fails(
    tiny_backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = AdapterStore(tmp_path / "store")
    store.commit_dir("alpha", make_adapter(tiny_backbone, "alpha", seed=0).save(tmp_path / "a1"))
    registry = Registry(tiny_backbone, store)
    registry.load_all()
    registry.upload("alpha", *adapter_files(make_adapter(tiny_backbone, "alpha", seed=1), tmp_path / "a2"))
    served = registry.get("alpha")
    assert served.version == 2
    new_files = adapter_files(make_adapter(tiny_backbone, "alpha", seed=2), tmp_path / "a3")
    monkeypatch.setattr(store_mod, "_write_durably", raising(errno.ENOSPC))
    monkeypatch.setattr(store_mod, "_write_durably_replace", raising(errno.ENOSPC))
    with pytest.raises(StoreUnwritable):
        registry.upload("alpha", *new_files)
    with pytest.raises(StoreUnwritable):
        registry.rollback("alpha")
    monkeypatch.setattr(store_mod.os, "rename", raising(errno.EIO))
    with pytest.raises(StoreUnwritable):
        registry.retire("alpha")
    monkeypatch.undo()
    assert registry.get("alpha") is served and registry.names() == ["alpha"]
    assert store.get("alpha").current == 2


async def test_the_edge_answers_507_and_a_read_only_store_still_serves(
    tiny_backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_root = tmp_path / "store"
    AdapterStore(store_root).commit_dir("alpha", make_adapter(tiny_backbone, "alpha").save(tmp_path / "a1"))
    config_bytes, weights_bytes = adapter_files(make_adapter(tiny_backbone, "alpha", seed=1), tmp_path / "a2")
    files = {"config": ("c.json", config_bytes), "weights": ("w.safetensors", weights_bytes)}
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    monkeypatch.setattr(store_mod, "_open_lock_file", raising(errno.EROFS))
    settings = Settings(store=store_root, admin_token=ADMIN_TOKEN, seed_demo_tasks=True, max_wait_ms=2)
    async with serving(create_app(settings, backbone=tiny_backbone)) as client:
        assert (await client.get("/readyz")).status_code == 200
        r = await client.post("/classify/alpha", json={"text": "good"})
        assert r.status_code == 200 and r.json()["version"] == 1
        r = await client.put("/admin/tasks/alpha", files=files, headers=auth)
        assert r.status_code == 507 and r.json()["error"]["type"] == "store_unwritable"
        assert "read-only" in r.json()["error"]["message"]

        monkeypatch.undo()  # writable again, but the disk fills up during the upload
        monkeypatch.setattr(store_mod, "_write_durably", raising(errno.ENOSPC))
        r = await client.put("/admin/tasks/alpha", files=files, headers=auth)
        assert r.status_code == 507 and r.json()["error"]["type"] == "store_unwritable"
        assert "the disk is full (ENOSPC" in r.json()["error"]["message"]
        r = await client.post("/classify/alpha", json={"text": "good"})
        assert r.status_code == 200 and r.json()["version"] == 1
        monkeypatch.undo()
        r = await client.put("/admin/tasks/alpha", files=files, headers=auth)
        assert r.status_code == 201 and r.json()["version"] == 2


# ---- the real thing: a small tmpfs ------------------------------------------------------------------------------


def _mount(args: list[str]) -> str | None:
    """None on success, else why not."""
    if shutil.which("mount") is None:
        return "no mount command"
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    return None if done.returncode == 0 else (" ".join(done.stderr.split()) or f"mount exited {done.returncode}")


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs; skipped where mounting is not allowed (not root, or no CAP_SYS_ADMIN, as in most CI)."""
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    why_not = _mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)])
    if why_not is not None:
        pytest.skip(f"cannot mount a tmpfs to play a full or read-only disk ({why_not}); needs root with "
                    "CAP_SYS_ADMIN. The same paths are tested through the write seams above.")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def free_blocks(path: Path) -> int:
    return os.statvfs(path).f_bfree


def test_real_full_disk_during_upload_rollback_and_delete(tmpfs: Path) -> None:
    root = tmpfs / "store"
    s = two_versions(root)
    before, free_before = snapshot(root), free_blocks(tmpfs)

    with pytest.raises(StoreUnwritable, match=r"the disk is full \(ENOSPC on .*adapter_model\.safetensors"):
        s.commit("t", cfg(3), weights(3, size=2 << 20))
    assert snapshot(root) == before
    assert free_blocks(tmpfs) == free_before  # the half-written upload gave its space back
    assert s.get("t").current == 2

    filler = tmpfs / "filler"
    with pytest.raises(OSError) as full, open(filler, "wb") as f:
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(StoreUnwritable, match=r"cannot roll back 't': the disk is full \(ENOSPC"):
        s.rollback("t")
    with pytest.raises(StoreUnwritable, match="disk is full"):
        s.commit("t", cfg(3), weights(3))
    assert snapshot(root) == before
    assert s.get("t").current == 2
    # Deleting needs no space, so an operator can always make room by retiring a task.
    s.retire("t")
    assert s.tasks() == {} and entries(root / ".tmp") == []
    filler.unlink()
    assert s.commit("t", cfg(1), weights(1)).current == 1


def test_real_read_only_remount(tmpfs: Path) -> None:
    root = tmpfs / "store"
    two_versions(root)
    (root / ".tmp" / "stage-t-left-by-a-crash").mkdir()
    before = snapshot(root)
    why_not = _mount(["-o", "remount,ro", str(tmpfs)])
    if why_not is not None:
        pytest.skip(f"cannot remount the tmpfs read-only ({why_not})")
    try:
        s = AdapterStore(root)
        assert s.read_only_reason is not None and "read-only" in s.read_only_reason
        assert s.get("t").current == 2
        with pytest.raises(StoreUnwritable, match="remount it read-write"):
            s.commit("t", cfg(3), weights(3))
        with pytest.raises(StoreUnwritable, match="read-only"):
            s.rollback("t")
        assert s.seed(root) == []
        assert snapshot(root) == before
    finally:
        assert _mount(["-o", "remount,rw", str(tmpfs)]) is None
    # Writable again: no restart needed, and the crash leftover is recovered first.
    assert s.commit("t", cfg(3), weights(3)).current == 3
    assert entries(root / ".tmp") == []
