from __future__ import annotations

from pathlib import Path

import pytest

from lpt_serve.model.backbone import Backbone, quiet_transformers
from lpt_serve.serving.store import AdapterStore
from tests.helpers import ServerProcess, make_adapter
from tests.tiny import make_tiny_bert

quiet_transformers()


@pytest.fixture(scope="session", autouse=True)
def private_data_dirs(tmp_path_factory):
    """No test writes into the user's real data or cache directories: a server started without --store (or a
    `lpt data` without LPT_DATA_DIR) lands in a throwaway directory, in this process and its subprocesses."""
    root = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_DATA_HOME", str(root / "data"))
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        yield root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_mlm_folder(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert-mlm"), mlm=True)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_folder) -> Backbone:
    return Backbone.load(tiny_folder, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_mlm_backbone(tiny_mlm_folder) -> Backbone:
    return Backbone.load(tiny_mlm_folder, device="cpu", dtype="float32")


@pytest.fixture
def server(tiny_folder, store_root):
    """`lpt-serve` in a subprocess on the tiny backbone over `store_root`, admin token `helpers.ADMIN_TOKEN`."""
    srv = ServerProcess(tiny_folder, store_root)
    yield srv
    srv.stop()


@pytest.fixture
def store_root(tiny_backbone, tmp_path) -> Path:
    """A store with two tasks on the tiny backbone: `alpha` (prompt layer 1) and `beta` (prompt layer 2)."""
    store = AdapterStore(tmp_path / "store")
    for i, task in enumerate(["alpha", "beta"]):
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i, prompt_layer=i + 1).save(tmp_path / task))
    return tmp_path / "store"
