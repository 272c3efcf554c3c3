"""lpt-serve on Ray Serve (lpt_serve.api.ray_serve): a local Ray cluster runs two replicas on the tiny backbone
over one store; mixed-task traffic goes through Ray's HTTP proxy, and an upload through one request is answered
by every replica within 2 s. And the config files of deploy/ray are what `serve run` accepts."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from lpt_serve.api import ray_serve
from lpt_serve.api.app import create_app
from lpt_serve.api.settings import Settings
from lpt_serve.serving.store import AdapterStore
from tests.helpers import ADMIN_TOKEN, adapter_files, free_port, make_adapter, serving

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "deploy" / "ray").glob("*.yaml"))
REPLICAS = 2
TEXTS = ["good film", "a terrible movie", "it was not very great", "the film is bad", "great and good"]
# How long every replica may take to serve an upload made through one of them (the acceptance).
CONVERGENCE_S = 2.0


# ------------------------------------------------------------------------------------ the config files
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_file_is_a_serve_config_of_this_application(config: Path) -> None:
    schema = ServeDeploySchema.model_validate(yaml.safe_load(config.read_text()))
    [application] = schema.applications
    module, _, attribute = application.import_path.partition(":")
    assert (module, getattr(ray_serve, attribute)) == (ray_serve.__name__, ray_serve.app_builder)
    ray_serve.check_args(application.args)  # every arg is a setting
    Settings(**application.args, store=REPO)  # and its value one lpt-serve takes (the store is the environment's)
    assert "admin_token" not in application.args, "the config is shown by `serve status`: no token in it"
    [deployment] = application.deployments
    assert deployment.name == ray_serve.DEPLOYMENT_NAME, "options for a deployment the application does not have"
    # A replica batches its requests in flight: it must take more than Ray's default of 5 at once.
    assert deployment.max_ongoing_requests > 5
    scaling = deployment.autoscaling_config
    assert scaling and scaling["target_ongoing_requests"] < deployment.max_ongoing_requests
    # Requests in flight finish before the Service stops.
    assert deployment.graceful_shutdown_timeout_s > Settings.model_fields["request_timeout_s"].default
    gpus = deployment.ray_actor_options.num_gpus or 0
    assert gpus == (1 if application.args.get("device", "auto").startswith("cuda") else 0)


def test_a_misspelt_arg_is_refused() -> None:
    with pytest.raises(ValueError, match="max_wait"):
        ray_serve.app_builder({"max_wait": 5})


def test_a_replica_without_a_store_is_refused(monkeypatch) -> None:
    # Each replica would make its own default store on its own node and serve other tasks than the rest.
    monkeypatch.delenv("LPT_STORE", raising=False)
    with pytest.raises(ray_serve.MissingStore):
        ray_serve.replica_settings({})
    monkeypatch.setenv("LPT_STORE", str(REPO))
    assert ray_serve.replica_settings({}).store == REPO


# ----------------------------------------------------------------------------------- the Ray cluster
# The tests below share one local Ray cluster (module scope): `slow`, since starting it and its replicas takes
# about a minute on 2 cores.
@pytest.fixture(scope="module")
def ray_app(tiny_folder, tiny_backbone, tmp_path_factory):
    """Two replicas of the app on a local Ray cluster, behind Ray's proxy on a free port: (proxy url, store)."""
    root = tmp_path_factory.mktemp("ray-store")
    store = root / "store"
    writer = AdapterStore(store)
    for i, task in enumerate(["alpha", "beta"]):
        writer.commit_dir(task, make_adapter(tiny_backbone, task, seed=i, prompt_layer=i + 1).save(root / task))
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        # The store comes from the environment, as in deploy/ray/serve.yaml: Ray's processes, started by
        # ray.init below, pass it on to every replica.
        env.setenv("LPT_STORE", str(store))
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")  # no report over the network
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            args = ray_serve.check_args({"backbone": str(tiny_folder), "admin_token": ADMIN_TOKEN, "max_wait_ms": 2,
                                         "seed_demo_tasks": False, "log_level": "warning"})
            application = ray_serve.LptServe.options(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 1})
            serve.run(application.bind(args), name="lpt", route_prefix="/")
            yield f"http://127.0.0.1:{port}", store
        finally:
            serve.shutdown()
            ray.shutdown()


async def classify_mixed(client: httpx.AsyncClient, i: int) -> httpx.Response:
    items = [{"task": task, "text": TEXTS[(i + j) % len(TEXTS)]} for j, task in enumerate(["alpha", "beta", "alpha"])]
    return await client.post("/classify", json={"items": items})


def replica_of(response: httpx.Response) -> str:
    replica = response.headers.get(ray_serve.REPLICA_HEADER)
    assert replica, f"no {ray_serve.REPLICA_HEADER} header: {dict(response.headers)}"
    return replica


@pytest.mark.slow
async def test_replicas_start_their_service_and_answer_mixed_traffic_as_lpt_serve_does(ray_app, tiny_backbone):
    url, store = ray_app
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        responses = await asyncio.gather(*(classify_mixed(client, i) for i in range(48)))
        readiness = await asyncio.gather(*(client.get("/readyz") for _ in range(16)))
    assert [r.status_code for r in responses] == [200] * len(responses), [r.text for r in responses[:3]]
    answered = Counter(replica_of(r) for r in responses)
    assert len(answered) == REPLICAS, f"requests were answered by {dict(answered)}"
    # Each replica is ready: its lifespan has started the Service (tasks loaded, batcher running, warmed up).
    for response in readiness:
        assert response.status_code == 200 and response.json()["tasks"] == 2, response.text
    # The same answers as the app `lpt-serve` runs, in this process, over the same store.
    current = {task: record.current for task, record in AdapterStore.read_only(store).tasks().items()}
    reference_app = create_app(Settings(store=store, max_wait_ms=2, seed_demo_tasks=False), backbone=tiny_backbone)
    async with serving(reference_app) as local:
        expected = await asyncio.gather(*(classify_mixed(local, i) for i in range(len(responses))))
    for got, want in zip(responses, expected, strict=True):
        for prediction, reference in zip(got.json()["predictions"], want.json()["predictions"], strict=True):
            assert prediction["version"] == current[prediction["task"]]
            assert (prediction["task"], prediction["label"]) == (reference["task"], reference["label"])
            assert prediction["score"] == pytest.approx(reference["score"], abs=1e-4)


@pytest.mark.slow
async def test_an_upload_through_one_replica_is_served_by_every_replica_within_2_s(ray_app, tiny_backbone, tmp_path):
    url, store = ray_app
    before = AdapterStore.read_only(store).tasks()["alpha"].current
    config, weights = adapter_files(make_adapter(tiny_backbone, "alpha", seed=42, prompt_layer=2), tmp_path / "new")
    failures: list[str] = []
    stop = asyncio.Event()

    async def background_traffic(client: httpx.AsyncClient) -> int:
        """Mixed classification all through the change: not one request may fail."""
        sent = 0
        while not stop.is_set():
            batch = await asyncio.gather(*(classify_mixed(client, sent + i) for i in range(4)))
            failures.extend(f"{r.status_code} {r.text}" for r in batch if r.status_code != 200)
            sent += len(batch)
        return sent

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        traffic = asyncio.create_task(background_traffic(client))
        upload = await client.put("/admin/tasks/alpha", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                                  files={"config": ("adapter_config.json", config),
                                         "weights": ("adapter_model.safetensors", weights)})
        uploaded_at = time.monotonic()
        assert upload.status_code == 201, upload.text
        new = upload.json()["version"]
        assert new == before + 1
        uploader = replica_of(upload)
        # Poll every replica until each answers with the new version: a round of concurrent requests reaches
        # both; the change is served everywhere once a round in which every replica answered saw only `new`.
        rounds: list[dict[str, set[int]]] = []
        converged_after = None
        while time.monotonic() - uploaded_at < CONVERGENCE_S + 3:  # watch a while past the deadline, to report
            batch = await asyncio.gather(*(client.post("/classify/alpha", json={"text": "good film"})
                                           for _ in range(8)))
            failures.extend(f"{r.status_code} {r.text}" for r in batch if r.status_code != 200)
            seen: dict[str, set[int]] = {}
            for response in batch:
                if response.status_code == 200:
                    seen.setdefault(replica_of(response), set()).add(response.json()["version"])
            rounds.append(seen)
            if len(seen) == REPLICAS and all(versions == {new} for versions in seen.values()):
                converged_after = time.monotonic() - uploaded_at
                break
        stop.set()
        sent = await traffic
        # Every replica says on /readyz that it serves the store's generation (the upload's, or a later one).
        generation = AdapterStore.read_only(store).generation()
        reported: dict[str, int] = {}
        while len(reported) < REPLICAS and time.monotonic() - uploaded_at < CONVERGENCE_S + 10:
            for response in await asyncio.gather(*(client.get("/readyz") for _ in range(8))):
                assert response.status_code == 200, response.text
                reported[replica_of(response)] = response.json()["store_generation"]
    assert not failures, f"{len(failures)} requests failed during the change, e.g. {failures[:3]}"
    assert sent > 0
    assert converged_after is not None, (
        f"not every replica served v{new} within {CONVERGENCE_S + 3:.0f}s of the upload (through {uploader}); "
        f"the last rounds saw {rounds[-3:]}")
    assert converged_after <= CONVERGENCE_S, f"every replica served v{new} only after {converged_after:.2f}s"
    assert len(reported) == REPLICAS and set(reported.values()) == {generation}, (generation, reported)



@pytest.mark.slow
def test_the_service_starts_and_stops_with_the_replica(ray_app, tiny_folder, tmp_path) -> None:
    """Ray Serve runs the app's lifespan in the replica: startup before the replica takes traffic, shutdown when
    it stops. A replica built by `build_replica_app` (what LptServe's replicas run) records both ends."""
    _, store = ray_app

    @serve.deployment(ray_actor_options={"num_cpus": 1})
    @serve.ingress()
    class Recording:  # defined here, so that Ray ships it by value to the replica
        def __init__(self, args: dict, markers: str) -> None:
            self.args, self.markers = args, Path(markers)

        async def __serve_build_asgi_app__(self):
            app = await ray_serve.build_replica_app(self.args)
            service = app.state.service
            start, stop = service.start, service.stop

            async def recording_start() -> None:
                await start()
                (self.markers / "started").write_text(str(service.ready))

            async def recording_stop() -> None:
                await stop()
                (self.markers / "stopped").write_text(str(service.ready))

            service.start, service.stop = recording_start, recording_stop
            return app

    markers = tmp_path / "markers"
    markers.mkdir()
    args = ray_serve.check_args({"store": str(store), "backbone": str(tiny_folder), "seed_demo_tasks": False,
                                 "log_level": "warning"})
    serve.run(Recording.bind(args, str(markers)), name="recording", route_prefix="/recording")
    try:
        # serve.run returns once the replica is up: its Service has started and is ready.
        assert (markers / "started").read_text() == "True"
        assert not (markers / "stopped").exists()
    finally:
        serve.delete("recording")
    assert (markers / "stopped").read_text() == "False", "the replica stopped without stopping its Service"
