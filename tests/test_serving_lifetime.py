"""A SIGKILLed `serving.server` or demo takes tritonserver, its stubs and the proxy with it.

They are started with PR_SET_PDEATHSIG (serving/processes.py): the kernel kills them when their
parent dies, which no signal handler of the parent can do after a SIGKILL.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")

from serving.processes import descendants, free_ports  # noqa: E402
from tests.test_demo import _alive as alive  # noqa: E402
from tests.test_serving_server import repository  # noqa: E402, F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def start(args: list[str], log: Path, ready_line: str) -> tuple[subprocess.Popen, list[int]]:
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while ready_line not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{args[1]} did not come up: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.3)
    children = descendants(process.pid)
    names = {Path(Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode()).name for p in children}
    assert {"tritonserver", "triton_python_backend_stub", "caddy"} <= names, names
    return process, children


def assert_all_end(process: subprocess.Popen, children: list[int], within: float = 30.0) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + within
    while (left := [p for p in children if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:  # never leave them to the next test, whatever the assertion says
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running {within:.0f} s after the parent's SIGKILL: {left}"


def test_sigkilled_server_cli_leaves_nothing_running(repository, tmp_path):  # noqa: F811
    http, grpc, metrics = free_ports(3)
    process, children = start(
        [
            "-m",
            "serving.server",
            "--model-repository",
            str(repository),
            "--http-port",
            str(http),
            "--grpc-port",
            str(grpc),
            "--metrics-port",
            str(metrics),
        ],
        tmp_path / "server.out",
        "ready: models",
    )
    assert_all_end(process, children)


def test_sigkilled_demo_leaves_nothing_running(repository, tmp_path):  # noqa: F811
    process, children = start(
        ["-m", "serving.demo", "--start-triton", str(repository), "--port", str(free_ports(1)[0])],
        tmp_path / "demo.out",
        "demo: http",
    )
    assert_all_end(process, children)
