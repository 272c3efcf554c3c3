"""Schemathesis against the app's own /openapi.json over real HTTP, every check on: no 500, no status the
document does not list, bodies in the documented shapes, invalid input refused, the admin token enforced."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from lpt_serve.serving.store import AdapterStore
from tests.helpers import ADMIN_TOKEN, ThreadedServer, make_adapter

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

CONFIG = schemathesis.Config.from_dict({
    "generation": {"mode": "all", "max-examples": 30},
    "checks": {
        # The schema cannot say that a text must hold a non-space character, nor how long it may be against the
        # server's limits, nor that `text` and `texts` exclude each other (it says so in words), nor what makes
        # the bytes of an upload an adapter: valid-by-schema requests may still get a documented 400 (bad
        # adapter), 413 or 422.
        "positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "404", "409", "413", "422"]},
    },
})


@pytest.fixture(scope="module")
def api(tiny_backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("schemathesis")
    store = AdapterStore(root / "store")
    # "0" is the simplest name the task-name pattern generates, so generated requests often reach a served task.
    for i, task in enumerate(["0", "alpha"]):
        store.commit_dir(task, make_adapter(tiny_backbone, task, seed=i, prompt_layer=i + 1).save(root / task))
    app = create_app(Settings(store=root / "store", admin_token=ADMIN_TOKEN, max_wait_ms=2), backbone=tiny_backbone)
    server = ThreadedServer(app)
    yield server
    server.stop()


def served_document() -> dict:
    # Built at import, for parametrize to make one test per operation; `test_the_tested_document_is_served` checks
    # it is the document the running server serves. (schemathesis.pytest.from_fixture would load it from the server,
    # but its lazy loader breaks on pytest 9: it sets `Function._nodeid`, which pytest no longer has.)
    unused_store = Path(tempfile.gettempdir()) / "lpt-schemathesis-store-never-made"
    return create_app(Settings(store=unused_store, admin_token=ADMIN_TOKEN)).openapi()


DOCUMENT = served_document()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


def test_the_tested_document_is_served(api):
    assert httpx.get(f"{api.url}/openapi.json").json() == DOCUMENT


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_keeps_its_documented_contract(case, api):
    case.call_and_validate(base_url=api.url, headers=AUTH if case.path.startswith("/admin/") else None)
