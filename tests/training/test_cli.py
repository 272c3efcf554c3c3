"""The first hour with `lpt` and `lpt-serve`: every mistake a new user makes ends in one sentence and exit status 2,
and `--help` says what each flag does, its real default and the variables that set it."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from lpt_serve.cli import build_parser
from tests.helpers import ADMIN_TOKEN, free_port, make_adapter

ROWS = [("a fine film", "pos"), ("a dull film", "neg"), ("great acting", "pos"), ("boring plot", "neg")]
# Variables the commands read; removed from the children's environment so the runner's own cannot leak in.
CLI_VARIABLES = ("LPT_URL", "LPT_ADMIN_TOKEN", "LPT_BACKBONE", "LPT_DATA_DIR")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")


def run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in CLI_VARIABLES}
    return subprocess.run([sys.executable, "-m", module, *args], env=base | (env or {}), capture_output=True,
                          text=True, timeout=120)


def lpt(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run("lpt_serve.cli", *args, env=env)


def assert_one_sentence(done: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2 and a single line on stderr that holds every needle; answers that line."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_rows(path, rows=ROWS):
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    return path


def nobody_listening() -> str:
    """A URL with no server: a command that reaches for the network there fails with 'cannot reach'."""
    return f"http://127.0.0.1:{free_port()}"


# ------------------------------------------------------------------------------------------- upload's folder
@pytest.mark.parametrize(
    "layout,needle",
    [("missing", "does not exist"), ("file", "is a file"), ("no-weights", "adapter_model.safetensors"),
     ("empty", "adapter_config.json")],
)
def test_upload_checks_the_adapter_directory_before_any_request(tmp_path, layout, needle):
    folder = tmp_path / "adapter"
    if layout == "file":
        folder.write_text("not a directory")
    elif layout == "no-weights":
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
    elif layout == "empty":
        folder.mkdir()
    done = lpt("upload", "gamma", str(folder), "--url", nobody_listening(), "--token", ADMIN_TOKEN)
    line = assert_one_sentence(done, str(folder), needle)
    assert "cannot reach" not in line  # decided on the local folder, before any HTTP


# ---------------------------------------------------------------------------------------------- task names
def test_train_refuses_a_bad_task_name_up_front(tiny_folder, tmp_path):
    data = write_rows(tmp_path / "d.jsonl")
    done = lpt("train", "--data", str(data), "--task", "My Task", "--out", str(tmp_path / "o"),
               "--backbone", str(tiny_folder), "--no-progress", "--epochs", "1")
    line = assert_one_sentence(done, "'My Task'", "a-z")
    assert "pydantic" not in line and "validation error" not in line
    assert not (tmp_path / "o").exists()


def test_train_names_the_data_file_when_its_name_is_no_task_name(tiny_folder, tmp_path):
    data = write_rows(tmp_path / "My Reviews.jsonl")
    done = lpt("train", "--data", str(data), "--out", str(tmp_path / "o"), "--backbone", str(tiny_folder),
               "--no-progress", "--epochs", "1")
    assert_one_sentence(done, "'My Reviews'", "--task")


@pytest.mark.parametrize("command", ["upload", "rollback", "delete"])
def test_admin_commands_refuse_a_bad_task_name_before_any_request(tiny_backbone, tmp_path, command):
    folder = make_adapter(tiny_backbone, "alpha").save(tmp_path / "adapter")
    args = [command, "My Task", *([str(folder)] if command == "upload" else [])]
    done = lpt(*args, "--url", nobody_listening(), "--token", ADMIN_TOKEN)
    line = assert_one_sentence(done, "'My Task'", "a-z")
    assert "cannot reach" not in line


# ---------------------------------------------------------------------------------------------- --device cuda
@no_cuda
def test_serve_with_cuda_on_a_cpu_torch_is_one_sentence(tiny_folder, tmp_path):
    done = run("lpt_serve.api.main", "--device", "cuda", "--backbone", str(tiny_folder), "--store",
               str(tmp_path / "store"))
    assert_one_sentence(done, "lpt-serve:", "'cuda'", "--device cpu")


@no_cuda
@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_with_cuda_on_a_cpu_torch_are_one_sentence(tiny_folder, tiny_backbone, tmp_path, command):
    data = write_rows(tmp_path / "d.jsonl")
    if command == "train":
        args = ["train", "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]
    else:
        args = ["eval", "--data", str(data), "--adapter", str(make_adapter(tiny_backbone, "d").save(tmp_path / "a"))]
    done = lpt(*args, "--backbone", str(tiny_folder), "--device", "cuda")
    assert_one_sentence(done, f"lpt {command}:", "'cuda'", "--device cpu")


@no_cuda
def test_train_checks_the_device_before_reading_data(tiny_folder, tmp_path):
    # A dataset name would be fetched first, which can take minutes; the device is known to be wrong at once.
    done = lpt("train", "--data", str(tmp_path / "nothing-yet.jsonl"), "--out", str(tmp_path / "o"),
               "--backbone", str(tiny_folder), "--device", "cuda")
    assert_one_sentence(done, "'cuda'")


# -------------------------------------------------------------------------------------------- against a server
def test_rollback_and_delete(server, tiny_backbone, tmp_path):
    env = {"LPT_URL": server.url, "LPT_ADMIN_TOKEN": ADMIN_TOKEN}
    folder = make_adapter(tiny_backbone, "alpha", seed=5).save(tmp_path / "v2")
    assert json.loads(lpt("upload", "alpha", str(folder), env=env).stdout) == {"task": "alpha", "version": 2}

    rolled = lpt("rollback", "alpha", env=env)
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout) == {"task": "alpha", "version": 1}
    assert_one_sentence(lpt("rollback", "alpha", env=env), "lpt rollback:", "409")  # no version before v1

    deleted = lpt("delete", "beta", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert "beta" in deleted.stdout and "deleted" in deleted.stdout
    listed = lpt("tasks", env=env).stdout.splitlines()[1:]
    assert [line.split()[0] for line in listed] == ["alpha"]
    assert_one_sentence(lpt("delete", "beta", env=env), "lpt delete:", "beta")


def test_admin_commands_say_how_to_send_the_token(server, tiny_backbone, tmp_path):
    folder = make_adapter(tiny_backbone, "alpha", seed=5).save(tmp_path / "v2")
    for args in (["upload", "alpha", str(folder)], ["rollback", "alpha"], ["delete", "alpha"]):
        missing = lpt(*args, env={"LPT_URL": server.url})
        assert_one_sentence(missing, "401", "no admin token was sent", "LPT_ADMIN_TOKEN", "--token")
        wrong = lpt(*args, "--token", "not-the-token", env={"LPT_URL": server.url})
        assert_one_sentence(wrong, "403", "LPT_ADMIN_TOKEN", "--token")
        wrong_variable = lpt(*args, env={"LPT_URL": server.url, "LPT_ADMIN_TOKEN": "not-the-token"})
        assert_one_sentence(wrong_variable, "403", "LPT_ADMIN_TOKEN", "--token")
    assert lpt("tasks", env={"LPT_URL": server.url}).stdout.count("alpha") == 1  # nothing was changed


# ---------------------------------------------------------------------------------------------------- --help
def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def help_entries(text: str) -> dict[str, str]:
    """Flag -> its whole help entry (the lines under `options:` until the epilog)."""
    options = text.split("options:\n", 1)[1].split("\n\n", 1)[0]
    entries: dict[str, str] = {}
    flag = ""
    for line in options.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = line
        else:
            entries[flag] += " " + line.strip()
    return entries


def test_lpt_help_names_the_environment_variables():
    done = lpt("--help")
    assert done.returncode == 0
    for variable in CLI_VARIABLES:
        assert variable in done.stdout
    for command in ("rollback", "delete"):
        assert command in done.stdout


@pytest.mark.parametrize("command", ["classify", "tasks", "upload", "rollback", "delete"])
def test_url_help_names_lpt_url(command):
    done = lpt(command, "--help", env={"COLUMNS": "200"})
    [url_line] = [line for line in done.stdout.splitlines() if line.strip().startswith("--url")]
    assert "LPT_URL" in url_line


def test_only_admin_commands_take_a_token():
    parser = build_parser()
    takes_token = {name for name, sub in subcommands(parser).items()
                   if any("--token" in a.option_strings for a in sub._actions)}
    assert takes_token == {"upload", "rollback", "delete"}
    refused = lpt("classify", "alpha", "good", "--token", "x")
    assert refused.returncode == 2 and "unrecognized arguments: --token" in refused.stderr


@pytest.mark.parametrize("command", ["upload", "rollback", "delete"])
def test_token_help_names_its_variable_and_never_prints_the_secret(command):
    done = lpt(command, "--help", env={"COLUMNS": "200", "LPT_ADMIN_TOKEN": "s3cret-value-xyz"})
    [token_line] = [line for line in done.stdout.splitlines() if line.strip().startswith("--token")]
    assert "LPT_ADMIN_TOKEN" in token_line
    assert "s3cret-value-xyz" not in done.stdout


def test_every_lpt_option_has_help_and_no_misleading_default():
    parser = build_parser()
    for name, sub in {"lpt": parser, **subcommands(parser)}.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            assert action.help, f"lpt {name}: {action.option_strings or action.dest} has no help"
        assert sub.description, f"lpt {name} has no description"
        text = sub.format_help()
        for misleading in ("(default: None)", "(default: False)"):
            assert misleading not in text, f"lpt {name} --help shows {misleading}"


def test_lpt_train_help_states_real_defaults():
    entries = help_entries(lpt("train", "--help", env={"COLUMNS": "200"}).stdout)
    for flag, default in [("--epochs", "12"), ("--batch-size", "32"), ("--seed", "0"), ("--dropout", "0.1")]:
        words = entries[flag].split()
        assert words[-2:] == ["(default:", f"{default})"], entries[flag]
        assert len(words) > 4, f"{flag} has no help text: {entries[flag]}"


def test_serve_help_states_each_default_once(tmp_path):
    # Wide enough that no path wraps; XDG_DATA_HOME moves the per-user store, so the printed default is provably
    # computed (default_factory), not a constant.
    done = run("lpt_serve.api.main", "--help", env={"COLUMNS": "300", "XDG_DATA_HOME": str(tmp_path / "xdg")})
    assert done.returncode == 0
    assert "(default: None)" not in done.stdout and "(default None)" not in done.stdout
    entries = help_entries(done.stdout)
    assert len(entries) > 20
    for flag, entry in entries.items():
        if flag in ("-h", "--admin-token"):
            continue
        # One statement of the default: argparse-style "(default X)" or the description's own "default: X".
        assert len(re.findall(r"\(default|\bdefault:", entry)) == 1, entry
    assert "unset turns admin routes off" in entries["--admin-token"] and "default" not in entries["--admin-token"]
    assert f"(default {tmp_path / 'xdg' / 'lpt-serve' / 'store'})" in entries["--store"]
    assert "comma-separated" in entries["--pinned-tasks"]
