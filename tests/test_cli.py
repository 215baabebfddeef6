import subprocess
import sys

import pytest

from etrm import __version__


def run(*args):
    return subprocess.run([sys.executable, "-m", "etrm", *args], capture_output=True, text=True, timeout=120)


def test_version():
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"etrm {__version__}"


@pytest.mark.parametrize("group", ["data", "diagnose", "sweep"])
def test_every_group_shows_help(group):
    r = run(group, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and "Commands" in r.stdout


def test_unknown_command_is_a_usage_error():
    r = run("no-such-command")
    assert r.returncode == 2
    assert "No such command" in r.stderr
