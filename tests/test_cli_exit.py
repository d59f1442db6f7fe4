"""How the `sweep` command leaves the process: its exit code, without the interpreter's teardown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sweeps import cli
from tests.test_sweep import REPO


class Exited(Exception):
    """Raised by the fake `os._exit` / `sys.exit`, so the test process goes on."""


@pytest.fixture
def exits(monkeypatch):
    calls: list[tuple[str, object]] = []

    def record(kind):
        def exit_(code=0):
            calls.append((kind, code))
            raise Exited

        return exit_

    monkeypatch.setattr(cli.os, "_exit", record("fast"))
    monkeypatch.setattr(cli.sys, "exit", record("normal"))
    return calls


def test_a_command_s_exit_code_leaves_through_the_fast_exit(exits, monkeypatch):
    monkeypatch.setattr(cli, "app", lambda: (_ for _ in ()).throw(SystemExit(2)))
    for name in cli._NEEDS_NORMAL_EXIT:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(Exited):
        cli.main()
    assert exits == [("fast", 2)]


@pytest.mark.parametrize("module", ["ray", "vllm", "sweeps.executors.processes"])
def test_with_ray_vllm_or_worker_processes_loaded_the_exit_is_the_normal_one(exits, monkeypatch, module):
    monkeypatch.setattr(cli, "app", lambda: (_ for _ in ()).throw(SystemExit(0)))
    for name in cli._NEEDS_NORMAL_EXIT:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, module, object())
    with pytest.raises(Exited):
        cli.main()
    assert exits == [("normal", 0)]


def test_bad_input_still_exits_2_with_its_line_through_the_real_entry_point(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("name: typo\nmodle: {name_or_path: x}\n")
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "run", str(config)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "modle" in result.stderr and "Traceback" not in result.stderr
