"""Settings: validated once at start, one sentence per problem, and the serving layer gets exactly what it needs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from lpt_serve.api.settings import Settings
from lpt_serve.paths import default_store_dir, demo_adapters_dir
from lpt_serve.serving.service import ServiceConfig


def test_the_service_gets_every_setting_it_shares_with_the_edge(tmp_path):
    settings = Settings(store=tmp_path, max_batch_size=7, runtime="onnxruntime", quarantine_after=2,
                        pinned_tasks="a, b", keep_versions=0, seed_demo_tasks=False)
    config = settings.service_config()
    shared = [f.name for f in dataclasses.fields(ServiceConfig) if f.name in Settings.model_fields]
    assert {"store", "max_batch_size", "runtime", "quarantine_after", "request_timeout_s"} <= set(shared)
    for name in shared:
        if name not in ("pinned_tasks", "keep_versions"):
            assert getattr(config, name) == getattr(settings, name), name
    assert config.pinned_tasks == ("a", "b") and config.keep_versions is None and config.seed_from is None
    assert Settings(store=tmp_path).service_config().seed_from == demo_adapters_dir()


def test_the_default_store_lives_outside_the_package():
    import lpt_serve

    store = Settings().store
    assert store == default_store_dir()
    assert not store.resolve().is_relative_to(Path(lpt_serve.__file__).resolve().parents[2])


def test_a_store_whose_parent_is_missing_is_refused(tmp_path):
    with pytest.raises(ValidationError, match="does not exist"):
        Settings(store=tmp_path / "no" / "such" / "store")
    assert Settings(store=tmp_path / "new").store == tmp_path / "new"  # one level: a new store, made at start


def test_an_empty_admin_token_turns_admin_off(monkeypatch, tmp_path):
    monkeypatch.setenv("LPT_ADMIN_TOKEN", "")
    assert not Settings(store=tmp_path).admin_enabled()


def test_a_rule_across_fields_is_reported_without_a_made_up_flag(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lpt_serve.api.main", "--store", str(tmp_path), "--admin-token",
                           "short"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "admin token (--admin-token / LPT_ADMIN_TOKEN) must be at least 8 characters" in done.stderr
    assert "--settings" not in done.stderr and "Traceback" not in done.stderr


def test_fastapis_opentelemetry_bridge_is_off_unless_asked_for(tmp_path):
    import inspect

    from fastapi import FastAPI

    from lpt_serve.api.app import create_app

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        pytest.skip("this FastAPI has no native OpenTelemetry bridge")
    quiet = create_app(Settings(store=tmp_path / "a"))
    assert not quiet._native_telemetry.enabled()
    assert quiet._telemetry["tracing"] is False and quiet._telemetry["metrics"] is False
    asked = create_app(Settings(store=tmp_path / "b", opentelemetry=True))
    assert asked._telemetry["tracing"] is True and asked._telemetry["metrics"] is True  # FastAPI's defaults
