"""The two distributions as pip builds them: the server wheel (`lpt-serve`, repository root) holds `lpt_serve` and
nothing else of the repository, with its demo adapters and dashboard files; the client wheel (`lpt-serve-client`,
clients/python) holds `lpt_client` and needs neither torch nor the server. The last test installs the client
wheel alone into a fresh virtual environment and classifies against a running server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest

from lpt_client import LptClient
from lpt_serve.format import CONFIG_NAME, WEIGHTS_NAME
from lpt_serve.serving.store import STATE_NAME, AdapterStore
from tests.helpers import ServerProcess

REPO = Path(__file__).resolve().parents[2]
CLIENT_PROJECT = REPO / "clients" / "python"
DEMO_TASKS = ("mr", "bbc", "tweets")
HEAVY_DISTRIBUTIONS = {"torch", "transformers", "fastapi", "uvicorn", "safetensors", "tokenizers", "numpy",
                       "lpt-serve"}
# Left out of the copy the wheels are built from: what a checkout holds besides its sources.
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", "build", "dist",
                                     ".pytest_cache", ".ruff_cache", ".hypothesis")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def _can_build_without_the_index() -> bool:
    """Both pyproject files require setuptools>=68; with `--no-build-isolation` pip uses this environment's. Before
    setuptools 70.1 the `wheel` package must be installed too (later setuptools builds wheels by itself)."""
    try:
        setuptools = _version_tuple(metadata.version("setuptools"))
    except metadata.PackageNotFoundError:
        return False
    if setuptools >= (70, 1):
        return True
    try:
        metadata.version("wheel")
    except metadata.PackageNotFoundError:
        return False
    return setuptools >= (68, 0)


BUILD_OFFLINE = _can_build_without_the_index()
# An isolated build fills its environment from the package index.
needs_index_to_build = (lambda test: test) if BUILD_OFFLINE else pytest.mark.network


def _project(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())["project"]


def _dist_info(project: dict) -> str:
    return f"{re.sub(r'[-_.]+', '_', project['name'])}-{project['version']}.dist-info"


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """Both wheels, built by pip from a copy of the checkout: an in-tree build writes build/ and *.egg-info next to
    the sources, which other work in this checkout would see. The copy keeps tests/ and bench/, so the server
    wheel leaving them out is its own doing."""
    root = tmp_path_factory.mktemp("dist")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    out = root / "wheels"
    isolation = ["--no-build-isolation"] if BUILD_OFFLINE else []
    built: dict[str, Path] = {}
    for key, project_dir in (("server", source), ("client", source / CLIENT_PROJECT.relative_to(REPO))):
        before = set(out.glob("*.whl"))
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out),
                               str(project_dir)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"pip wheel {project_dir}:\n{done.stderr}"
        (wheel,) = set(out.glob("*.whl")) - before
        built[key] = wheel
    return built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _top_level(wheel: Path) -> set[str]:
    return {name.split("/")[0] for name in _names(wheel)}


def _metadata(wheel: Path, project: dict):
    with zipfile.ZipFile(wheel) as archive:
        return Parser().parsestr(archive.read(f"{_dist_info(project)}/METADATA").decode())


def _requirement_names(message) -> set[str]:
    return {re.match(r"[A-Za-z0-9._-]+", r).group(0).lower() for r in message.get_all("Requires-Dist") or []}


def _modules(root: Path, package: str) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts}


@needs_index_to_build
def test_server_wheel_holds_lpt_serve_only_with_its_data(wheels) -> None:
    project = _project(REPO)
    wheel = wheels["server"]
    assert _top_level(wheel) == {"lpt_serve", _dist_info(project)}
    names = set(_names(wheel))
    # packages= in pyproject.toml is an explicit list: a new subpackage left off it would be missing here.
    assert {n for n in names if n.endswith(".py")} == _modules(REPO / "server", "lpt_serve")
    assert {f"lpt_serve/api/static/dashboard.{ext}" for ext in ("html", "css", "js")} <= names
    demo = {f"lpt_serve/demo_adapters/{task}/{file}" for task in DEMO_TASKS
            for file in (STATE_NAME, f"v1/{CONFIG_NAME}", f"v1/{WEIGHTS_NAME}")}
    assert {n for n in names if n.startswith("lpt_serve/demo_adapters/")} == demo
    with zipfile.ZipFile(wheel) as archive:
        for name in demo:
            shipped = REPO / "adapters_store" / name.removeprefix("lpt_serve/demo_adapters/")
            assert archive.read(name) == shipped.read_bytes(), name
    entry_points = _entry_points(wheel, project)
    assert entry_points == project["scripts"]
    for target in entry_points.values():
        assert target.split(":")[0].replace(".", "/") + ".py" in names, target
    assert "lpt-serve-client" in _requirement_names(_metadata(wheel, project))


@needs_index_to_build
def test_client_wheel_holds_lpt_client_and_needs_no_torch(wheels) -> None:
    project = _project(CLIENT_PROJECT)
    wheel = wheels["client"]
    assert _top_level(wheel) == {"lpt_client", _dist_info(project)}
    names = set(_names(wheel))
    assert {n for n in names if n.endswith(".py")} == _modules(CLIENT_PROJECT, "lpt_client")
    requirements = _requirement_names(_metadata(wheel, project))
    assert {"httpx", "pydantic"} <= requirements
    assert not requirements & HEAVY_DISTRIBUTIONS, requirements
    assert _entry_points(wheel, project) == project["scripts"]


def _entry_points(wheel: Path, project: dict) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(f"{_dist_info(project)}/entry_points.txt").decode()
    section = text.split("[console_scripts]", 1)[1].split("\n[", 1)[0]
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in section.splitlines() if "=" in line)


# Imports the server from the unpacked wheel (ahead of this checkout's editable install), and seeds a new store
# the way a first `lpt-serve` start does.
FIRST_START = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import lpt_serve
from lpt_serve.paths import demo_adapters_dir
import lpt_serve.serving.store as store_module
store = store_module.AdapterStore(Path(sys.argv[2]))
seeded = store.seed(demo_adapters_dir())
print(json.dumps({"modules": [lpt_serve.__file__, store_module.__file__], "demo": str(demo_adapters_dir()),
                  "seeded": seeded, "tasks": {name: record.current for name, record in store.tasks().items()}}))
"""


@needs_index_to_build
def test_installed_server_seeds_a_new_store_from_the_adapters_in_its_package(wheels, tmp_path) -> None:
    installed = tmp_path / "site-packages"
    with zipfile.ZipFile(wheels["server"]) as archive:
        archive.extractall(installed)
    done = subprocess.run([sys.executable, "-c", FIRST_START, str(installed), str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert all(Path(module).is_relative_to(installed) for module in report["modules"]), report["modules"]
    assert Path(report["demo"]) == installed / "lpt_serve" / "demo_adapters"
    assert sorted(report["seeded"]) == sorted(DEMO_TASKS)
    assert report["tasks"] == dict.fromkeys(DEMO_TASKS, 1)


# Runs in the fresh environment: what it could import, and one classification against the server in argv[1].
CLIENT_ONLY = """
import json, sys
import lpt_client
from lpt_client import LptClient
loaded_before = sorted(m for m in ("torch", "transformers", "fastapi", "numpy", "lpt_serve") if m in sys.modules)
try:
    import torch  # noqa: F401
    torch_importable = True
except ModuleNotFoundError:
    torch_importable = False
with LptClient(sys.argv[1]) as client:
    result = client.classify("alpha", ["good film"])
print(json.dumps({"prefix": sys.prefix, "client": lpt_client.__file__, "loaded": loaded_before,
                  "torch_importable": torch_importable, "task": result.task,
                  "predictions": [p.model_dump() for p in result.predictions]}))
"""


@pytest.mark.slow
@pytest.mark.network
def test_client_wheel_alone_in_a_fresh_venv_classifies(wheels, tiny_folder, store_root, tmp_path) -> None:
    venv = tmp_path / "venv"
    # No pip inside: this environment's pip installs into it, so the venv holds the client and its needs only.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile",
                              str(wheels["client"])], capture_output=True, text=True, timeout=300, env=environment)
    assert install.returncode == 0, install.stderr

    record = AdapterStore.read_only(store_root).tasks()["alpha"]
    labels = json.loads((record.path() / CONFIG_NAME).read_text())["labels"]
    server = ServerProcess(tiny_folder, store_root)
    try:
        done = subprocess.run([str(python), "-c", CLIENT_ONLY, server.url], capture_output=True, text=True,
                              timeout=120, env=environment, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        # The same call from this environment, for the answer to compare with.
        with LptClient(server.url) as client:
            expected = client.classify("alpha", ["good film"])
    finally:
        server.stop()
    report = json.loads(done.stdout)
    assert Path(report["prefix"]).resolve() == venv.resolve()
    assert Path(report["client"]).resolve().is_relative_to(venv.resolve())
    assert report["loaded"] == []
    assert report["torch_importable"] is False
    assert report["task"] == "alpha"
    (prediction,) = report["predictions"]
    assert prediction["label"] in labels
    assert set(prediction["scores"]) == set(labels)
    assert prediction["label"] == expected.predictions[0].label
