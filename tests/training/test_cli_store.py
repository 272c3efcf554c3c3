"""`lpt store`: change a shared store without a server; the servers on it serve the change on their own."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch

from lpt_serve.format import CONFIG_NAME
from lpt_serve.serving.store import AdapterStore
from tests.helpers import make_adapter
from tests.training.test_cli import assert_one_sentence, build_parser, lpt, subcommands


def store_env(store_root, tiny_folder) -> dict[str, str]:
    return {"LPT_STORE": str(store_root), "LPT_BACKBONE": str(tiny_folder)}


def served_version(url: str, task: str) -> int | None:
    r = httpx.post(f"{url}/classify/{task}", json={"text": "a fine film"}, timeout=10)
    return r.json()["version"] if r.status_code == 200 else None


def test_a_commit_is_served_by_a_running_server_without_a_request_to_it(server, store_root, tiny_folder,
                                                                         tiny_backbone, tmp_path):
    folder = make_adapter(tiny_backbone, "trained-as-something-else", seed=7).save(tmp_path / "new")
    done = lpt("store", "commit", "alpha", str(folder), env=store_env(store_root, tiny_folder))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["task"] == "alpha" and answer["version"] == 2
    # Stored under the name it was committed as (renamed, as an upload through the URL is).
    record = AdapterStore.read_only(store_root).get("alpha")
    assert json.loads((record.path() / CONFIG_NAME).read_text())["task"] == "alpha"
    deadline = time.monotonic() + 2.0  # the server polls the store every 0.5 s
    while served_version(server.url, "alpha") != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served_version(server.url, "alpha") == 2

    assert lpt("store", "rollback", "alpha", env=store_env(store_root, tiny_folder)).returncode == 0
    deleted = lpt("store", "delete", "beta", env=store_env(store_root, tiny_folder))
    assert deleted.returncode == 0, deleted.stderr
    deadline = time.monotonic() + 2.0
    while (served_version(server.url, "alpha"), served_version(server.url, "beta")) != (1, None) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert served_version(server.url, "alpha") == 1
    assert httpx.post(f"{server.url}/classify/beta", json={"text": "x"}).status_code == 404


def test_list_shows_versions_and_the_generation(store_root, tiny_folder):
    done = lpt("store", "list", env=store_env(store_root, tiny_folder))
    assert done.returncode == 0, done.stderr
    listing = json.loads(done.stdout)
    store = AdapterStore.read_only(store_root)
    assert listing["generation"] == store.generation()
    assert listing["tasks"] == {"alpha": {"version": 1, "versions": [1]}, "beta": {"version": 1, "versions": [1]}}


def test_an_adapter_for_another_backbone_is_refused_and_the_store_is_unchanged(store_root, tiny_folder,
                                                                              tiny_backbone, tmp_path):
    folder = make_adapter(tiny_backbone, "alpha", seed=3).save(tmp_path / "other")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["backbone"]["hidden_size"] = config["backbone"]["hidden_size"] * 2
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    before = AdapterStore.read_only(store_root)
    generation, versions = before.generation(), before.get("alpha").versions
    done = lpt("store", "commit", "alpha", str(folder), env=store_env(store_root, tiny_folder))
    assert_one_sentence(done, "lpt store commit:", "hidden size")
    after = AdapterStore.read_only(store_root)
    assert (after.generation(), after.get("alpha").versions) == (generation, versions)


@pytest.mark.parametrize("args,needles", [
    (("list", "--store", "/nonexistent/lpt-store"), ("no adapter store at /nonexistent/lpt-store", "LPT_STORE")),
    (("rollback", "alpha"), ("alpha",)),  # one version only: nothing to roll back to
    (("delete", "gamma"), ("gamma",)),
    (("commit", "Bad Name!", "."), ("task name",)),
])
def test_store_mistakes_are_one_sentence(store_root, tiny_folder, args, needles):
    assert_one_sentence(lpt("store", *args, env=store_env(store_root, tiny_folder)), *needles)


def test_every_store_command_explains_itself():
    store = subcommands(build_parser())["store"]
    for name, command in subcommands(store).items():
        assert command.description, f"lpt store {name} has no description"
        for action in command._actions:
            assert action.help, f"lpt store {name}: {action.option_strings or action.dest} has no help"
        assert "(default: None)" not in command.format_help()


def test_a_directory_that_is_no_store_is_refused_and_left_untouched(tmp_path, tiny_folder):
    folder = tmp_path / "projects"
    (folder / ".tmp" / "keepme").mkdir(parents=True)
    (folder / "notes" / "v1").mkdir(parents=True)
    (folder / "notes" / "v1" / "draft.txt").write_text("mine")
    for command in (("list",), ("delete", "notes"), ("rollback", "notes")):
        done = lpt("store", *command, "--store", str(folder), env={"LPT_BACKBONE": str(tiny_folder)})
        assert_one_sentence(done, "is not an adapter store")
    assert (folder / ".tmp" / "keepme").is_dir() and (folder / "notes" / "v1" / "draft.txt").read_text() == "mine"


def test_a_commit_is_checked_at_the_servers_dtype(store_root, tiny_folder, tiny_backbone, tmp_path):
    adapter = make_adapter(tiny_backbone, "alpha", seed=5)
    with torch.no_grad():
        next(adapter.parameters()).view(-1)[0] = 1e6  # fine in float32, beyond float16's +-65504
    folder = adapter.save(tmp_path / "big")
    env = store_env(store_root, tiny_folder)
    assert_one_sentence(lpt("store", "commit", "alpha", str(folder), "--dtype", "float16", env=env), "float16")
    assert AdapterStore.read_only(store_root).get("alpha").versions == (1,)
    assert lpt("store", "commit", "alpha", str(folder), env=env).returncode == 0
    assert AdapterStore.read_only(store_root).get("alpha").versions == (1, 2)


def test_keep_versions_prunes_as_the_servers_do(store_root, tiny_folder, tiny_backbone, tmp_path):
    folder = make_adapter(tiny_backbone, "alpha", seed=6).save(tmp_path / "next")
    env = store_env(store_root, tiny_folder)
    for _ in range(3):
        assert lpt("store", "commit", "alpha", str(folder), env=env | {"LPT_KEEP_VERSIONS": "2"}).returncode == 0
    assert AdapterStore.read_only(store_root).get("alpha").versions == (3, 4)
    assert lpt("store", "commit", "alpha", str(folder), "--keep-versions", "0", env=env).returncode == 0
    assert AdapterStore.read_only(store_root).get("alpha").versions == (3, 4, 5)
    refused = lpt("store", "commit", "alpha", str(folder), "--keep-versions", "-1", env=env)
    assert refused.returncode == 2 and "0 or more" in refused.stderr and "Traceback" not in refused.stderr
