"""Replicas on Ray Serve: each replica runs the app `lpt-serve` runs (`create_app`: the routes, the admin gate,
the body cap, the Service with its micro-batcher and metrics), behind Ray's HTTP proxy, which spreads requests
over the replicas and scales their number.

    LPT_STORE=/shared/lpt-store LPT_ADMIN_TOKEN=$(openssl rand -hex 16) serve run deploy/ray/serve.yaml

Every replica serves the store at LPT_STORE: it must be one directory that every node mounts (see the README's
"Running several replicas"). Settings come as in `lpt-serve`: LPT_* variables of each replica's environment,
overridden by the config file's `args` (the settings' field names: `max_wait_ms: 2`).

The app's own lifespan starts and stops the Service with the replica: Ray Serve builds the app in the replica
(`__serve_build_asgi_app__`), runs the app's lifespan startup before the replica takes traffic (backbone, every
task of the store, the batcher's thread, a warm-up pass), and its shutdown when the replica stops, after the
requests in flight (`graceful_shutdown_timeout_s`).

Ray is imported here and nowhere else in lpt_serve: the package imports without it; this module needs the `ray`
extra (`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

try:
    from ray import serve
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("lpt_serve.api.ray_serve needs Ray Serve: pip install 'lpt-serve[ray]'") from exc
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lpt_serve.api.settings import Settings

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "lpt-serve"
# The replica that answered, on every response: which one served a request is otherwise hidden behind the proxy.
REPLICA_HEADER = "x-lpt-replica"
# Ray Serve's throughput settings (user code on the replica's own event loop, the router on the proxy's, buffered
# request logs, gRPC between proxy and replicas, GC frozen after start-up), keeping Ray's HTTP proxy in front: its
# "direct ingress" would have every replica listen on the port itself. Set them in the environment `ray start` (or
# a local `serve run`) starts in; `python -m bench.replicas` measured 5-10% less CPU per request with them.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


class MissingStore(ValueError):
    """Replicas must be told where the shared store is: each would otherwise make its own per-user default store
    on its own node, and the replicas would serve different tasks."""


def check_args(args: dict[str, Any]) -> dict[str, Any]:
    """The config file's `args`, which are settings by field name; a misspelt name is refused here, since the
    settings themselves ignore unknown names."""
    unknown = sorted(set(args) - set(Settings.model_fields))
    if unknown:
        raise ValueError(f"args {unknown} name no lpt-serve setting; the settings are "
                         f"{', '.join(Settings.model_fields)}")
    return dict(args)


def replica_settings(args: dict[str, Any]) -> Settings:
    """Settings in a replica: its LPT_* environment, overridden by `args`; the store must be set in one of them."""
    settings = Settings(**args)
    if "store" not in settings.model_fields_set:
        raise MissingStore("set LPT_STORE (in the environment of every Ray node, or runtime_env.env_vars) or the "
                           "`store` arg to the shared store's path: every replica must serve the same store")
    return settings


class ReplicaHeader:
    """Adds `x-lpt-replica: <Ray's replica id>` to every HTTP response."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]}
            await send(message)

        await self.app(scope, receive, send_with_replica)


async def build_replica_app(args: dict[str, Any]) -> FastAPI:
    """The app of one replica: settings read here (the replica's environment), the backbone loaded before the app
    exists so that a bad backbone or store fails the replica with one sentence, as `lpt-serve` does."""
    from lpt_serve.api.app import create_app
    from lpt_serve.errors import BackboneError, StoreError
    from lpt_serve.serving.service import load_backbone
    from lpt_serve.serving.store import AdapterStore

    settings = replica_settings(args)
    logging.getLogger("lpt_serve").setLevel(settings.log_level.upper())  # Ray owns the handlers
    config = settings.service_config()
    try:
        AdapterStore.make_root(config.store)
        backbone = await asyncio.to_thread(load_backbone, config)
    except (BackboneError, StoreError) as exc:
        raise RuntimeError(f"lpt-serve replica: {exc.message}") from None
    app = create_app(settings, backbone=backbone, server_process=True)
    app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
    return app


# Defaults for a deployment made in code; deploy/ray/serve.yaml sets its own. A replica batches the rows of its
# requests in flight, so it takes many at once (Ray's default of 5 would cap a batch at 5 requests).
@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=128, graceful_shutdown_timeout_s=35)
@serve.ingress()
class LptServe:
    """One replica: the FastAPI app of `create_app`, built when the replica starts."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.args = args

    async def __serve_build_asgi_app__(self) -> FastAPI:
        return await build_replica_app(self.args)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application `serve run deploy/ray/serve.yaml` starts (its `import_path`), with the file's `args`."""
    return LptServe.bind(check_args(args or {}))
