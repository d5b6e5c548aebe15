"""Faults under load against `python -m serving.server`: a killed python-backend stub, a killed
tritonserver, a crash loop.

Triton 2.51's python backend does not restart a dead stub: the server stays ready and answers
every request to that model with HTTP 500 / gRPC INTERNAL "Stub process 'medoe_0_0' is not
healthy." (nothing in its log, even at --log-verbose=1). `serving.server` watches the stubs and,
with --restart, restarts tritonserver on the same ports; serving.client retries 5xx/INTERNAL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")
httpclient = pytest.importorskip("tritonclient.http")
pytest.importorskip("tritonclient.grpc")

from export.graph import random_images  # noqa: E402
from serving import client  # noqa: E402
from serving.processes import cmdline as _argv  # noqa: E402
from serving.processes import descendants  # noqa: E402
from serving.supervisor import start_server  # noqa: E402
from tests.test_demo import _alive  # noqa: E402
from tests.test_serving_server import free_ports, png, reference, repository, segment_request  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(40, 56), (37, 45), (48, 64)]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
    return value


class Supervisor:
    """`python -m serving.server [--restart] ...` on the test repository, with /proc helpers."""

    def __init__(self, repo: Path, tmp_path: Path, *extra: str):
        self.http_port, self.grpc_port, metrics_port = free_ports(3)
        self.out, self.err, self.log = tmp_path / "server.out", tmp_path / "server.err", tmp_path / "tritonserver.log"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "serving.server",
                    "--model-repository",
                    str(repo),
                    "--http-port",
                    str(self.http_port),
                    "--grpc-port",
                    str(self.grpc_port),
                    "--metrics-port",
                    str(metrics_port),
                    "--log-file",
                    str(self.log),
                    "--timeout",
                    "90",
                    *extra,
                ],
                cwd=ROOT,
                stdout=out,
                stderr=err,
            )
        _wait(lambda: "ready: models" in self.out.read_text() or self.process.poll() is not None, 120, "the server")
        assert self.process.poll() is None, self.err.read_text()

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def tritonserver(self) -> int | None:
        return next(
            (p for p in descendants(self.process.pid) if _alive(p) and _argv(p)[0].endswith("/tritonserver")), None
        )

    def stub(self, model: str) -> int | None:
        return next(
            (
                p
                for p in descendants(self.process.pid)
                if _alive(p) and f"models/{model}/1/model.py" in " ".join(_argv(p)[1:2])
            ),
            None,
        )

    def proxy(self) -> int | None:
        return next((p for p in descendants(self.process.pid) if _alive(p) and _argv(p)[0].endswith("/caddy")), None)

    def shm_regions(self) -> list[Path]:
        return [
            Path("/dev/shm", _argv(p)[2])
            for p in descendants(self.process.pid)
            if _argv(p)[0].endswith("triton_python_backend_stub")
        ]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def close(self) -> None:
        if self.process.poll() is not None:
            return
        left = descendants(self.process.pid)
        self.process.send_signal(signal.SIGTERM)  # the CLI stops tritonserver, which unlinks its /dev/shm regions
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:  # a hung test: kill whatever it started
            self.process.kill()
            self.process.wait()
            for pid in left:
                try:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture()
def supervise(repository, tmp_path):  # noqa: F811
    started = []

    def start(*extra: str) -> Supervisor:
        started.append(Supervisor(repository, tmp_path, *extra))
        return started[-1]

    yield start
    for supervisor in started:
        supervisor.close()


@pytest.fixture()
def retried(monkeypatch) -> list[tuple[str, str]]:
    """(status, message) of every error serving.client's with_retries classified in this test."""
    seen, transient = [], client._is_transient

    def record(err):
        seen.append((str(getattr(err, "status", lambda: type(err).__name__)()), client._server_message(err)))
        return transient(err)

    monkeypatch.setattr(client, "_is_transient", record)
    return seen


@pytest.fixture(scope="module")
def images(tmp_path_factory, repository) -> tuple[list[Path], list[np.ndarray]]:  # noqa: F811
    folder = tmp_path_factory.mktemp("fault-images")
    paths, expected = [], []
    for index, (height, width) in enumerate(SIZES):
        image = random_images(1, height, width, seed=40 + index)
        paths.append(folder / f"img{index}.png")
        paths[-1].write_bytes(png(image[0]))
        expected.append(reference(repository, image)["labels"][0])  # onnxruntime in-process
    return paths, expected


def test_dead_stub_answers_500_until_restart_and_client_retries_through(repository, images, retried):  # noqa: F811
    # Triton 2.51 alone: the stub is not restarted, the server stays ready, and every request gets
    # 500 / INTERNAL "Stub process 'medoe_0_0' is not healthy." The client retries those until
    # ServerHandle.restart() (what the CLI's --restart calls) brings the server back.
    paths, expected = images
    handle = start_server(repository, *free_ports(3), timeout=90)
    results = {}
    try:
        stub = next(pid for pid, (name, _) in handle.stubs.items() if name == "medoe_0_0")
        os.kill(stub, signal.SIGKILL)
        _wait(lambda: handle.dead_stubs() == ["medoe_0_0"], 10, "the dead stub to be noticed")
        assert handle.ready()  # Triton still says ready

        def segment(protocol: str):
            url = handle.http_url if protocol == "http" else handle.grpc_url
            try:
                results[protocol] = client.segment_images(paths, url, protocol, retries=8, backoff=0.25)[0]
            except client.ClientError as err:
                results[protocol] = err

        threads = [threading.Thread(target=segment, args=(p,)) for p in ("http", "grpc")]
        for thread in threads:
            thread.start()
        unhealthy = "Stub process 'medoe_0_0' is not healthy."
        _wait(
            lambda: {"500", "StatusCode.INTERNAL"} <= {s for s, m in retried if unhealthy in m},
            60,
            "500 and INTERNAL answers",
        )
        handle.restart(90)
        for thread in threads:
            thread.join(120)
        assert not handle.dead_stubs() and stub not in handle.stubs
    finally:
        handle.stop()
    for protocol in ("http", "grpc"):
        assert isinstance(results[protocol], list), f"{protocol}: {results[protocol]}"
        for result, labels in zip(results[protocol], expected, strict=True):
            np.testing.assert_array_equal(result.labels, labels)


def test_killed_stub_under_load_is_restarted_and_retries_finish_every_request(supervise, images, retried):
    paths, expected = images
    server = supervise("--restart")
    urls = {"http": f"127.0.0.1:{server.http_port}", "grpc": f"127.0.0.1:{server.grpc_port}"}
    before, _ = client.segment_images(paths, urls["http"], retries=0)  # the reference, before any fault
    for result, labels in zip(before, expected, strict=True):
        np.testing.assert_array_equal(result.labels, labels)
    calls, errors, stop = [], [], threading.Event()

    def load(protocol: str):
        while not stop.is_set():
            start = time.monotonic()
            try:
                results, _ = client.segment_images(paths, urls[protocol], protocol, retries=6, backoff=0.5)
            except Exception as err:  # noqa: BLE001 -- any failure is the test's failure
                errors.append(f"{protocol}: {type(err).__name__}: {err}")
                return
            calls.append((start, time.monotonic(), [r.labels for r in results]))

    threads = [threading.Thread(target=load, args=(p,)) for p in ("http", "grpc", "http", "grpc")]
    for thread in threads:
        thread.start()
    try:
        _wait(lambda: len(calls) >= 8, 60, "load before the kill")
        stub, regions = server.stub("medoe"), server.shm_regions()
        killed_at = time.monotonic()
        os.kill(stub, signal.SIGKILL)
        _wait(
            lambda: "restart: python-backend stub of medoe_0_0 died" in server.stderr(),
            30,
            "the supervisor's restart line",
        )
        new_stub = _wait(lambda: server.ready() and server.stub("medoe"), 60, "a new medoe stub")
        restarted_at = time.monotonic()
        _wait(lambda: sum(start > restarted_at for start, _, _ in calls) >= 8 or errors, 60, "load after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert not errors, errors[:3]
    assert retried, "no request failed: the retries were never put to the test"
    assert new_stub != stub and not _alive(stub)
    assert any(start < killed_at < end for start, end, _ in calls), "no request was in flight at the kill"
    for _, _, labels in calls:  # every request, before, across and after the kill, answered right
        for got, want in zip(labels, expected, strict=True):
            np.testing.assert_array_equal(got, want)
    assert not any(region.exists() for region in regions), "the dead server's /dev/shm regions leaked"
    assert server.stderr().count("restart:") == 1


def test_killed_tritonserver_restarts_on_the_same_ports_and_sigterm_stops_everything(supervise, images):
    paths, expected = images
    server = supervise("--restart")
    first, stubs, regions = (
        server.tritonserver(),
        [server.stub(m) for m in ("medoe", "segment")],
        server.shm_regions(),
    )
    assert first and all(stubs) and len(regions) == 2
    os.kill(first, signal.SIGKILL)
    _wait(lambda: "restart: tritonserver was killed by SIGKILL" in server.stderr(), 30, "the supervisor's restart line")
    second = _wait(lambda: server.ready() and server.tritonserver(), 60, "tritonserver to come back")
    assert second != first and not any(_alive(pid) for pid in stubs)
    assert not any(region.exists() for region in regions), "the killed server's /dev/shm regions leaked"
    http = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")  # the same port as before the kill
    try:
        labels = http.infer("segment", segment_request(httpclient, paths[1].read_bytes())).as_numpy("labels")
    finally:
        http.close()
    np.testing.assert_array_equal(labels, expected[1])
    grpc_results, _ = client.segment_images(paths[:1], f"127.0.0.1:{server.grpc_port}", "grpc", retries=0)
    np.testing.assert_array_equal(grpc_results[0].labels, expected[0])

    everything = descendants(server.process.pid)
    regions = server.shm_regions()
    assert second in everything and len(everything) == 4  # tritonserver, its two stubs and the HTTP proxy
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    assert not [pid for pid in everything if _alive(pid)], "SIGTERM left tritonserver or a stub running"
    assert not any(region.exists() for region in regions)
    assert not server.ready()
    assert server.stderr().count("restart:") == 1


def test_crash_loop_gives_up_after_max_restarts_with_one_line_error(supervise):
    server = supervise("--restart", "--max-restarts", "1", "--restart-window", "60")
    first = server.tritonserver()
    os.kill(first, signal.SIGKILL)
    second = _wait(lambda: server.ready() and server.tritonserver(), 60, "the first restart")
    left = descendants(server.process.pid)
    os.kill(second, signal.SIGKILL)
    assert server.process.wait(60) == 1
    lines = server.stderr().strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("restart: tritonserver was killed by SIGKILL")
    # Killed once it answered ready, or still inside the restart: a failure towards the cap either way.
    assert lines[1] in (
        "error: tritonserver was killed by SIGKILL (1 restarts within 60 s)",
        "error: restart failed: tritonserver was killed by SIGKILL (1 restarts within 60 s)",
    )
    assert not [pid for pid in left if _alive(pid)]


def test_dead_stub_without_restart_exits_1_instead_of_failing_every_request(supervise):
    # Without --restart the CLI must not keep a server that is "ready" but answers 500 to everything.
    server = supervise()
    left = descendants(server.process.pid)
    os.kill(server.stub("medoe"), signal.SIGKILL)
    assert server.process.wait(60) == 1
    lines = server.stderr().strip().splitlines()
    assert lines == ["error: python-backend stub of medoe_0_0 died; Triton 2.51 does not restart it"]
    assert not [pid for pid in left if _alive(pid)]


def test_killed_proxy_is_restarted_without_restarting_tritonserver(supervise):
    server = supervise("--restart")
    triton, proxy = server.tritonserver(), server.proxy()
    os.kill(proxy, signal.SIGKILL)
    _wait(lambda: "restart: the HTTP proxy (caddy) was killed by SIGKILL" in server.stderr(), 30, "the restart line")
    _wait(server.ready, 60, "HTTP through a new proxy")
    assert server.proxy() not in (None, proxy) and server.tritonserver() == triton  # the models stayed loaded


def test_killed_proxy_without_restart_exits_1_with_one_line(supervise):
    server = supervise()
    left = descendants(server.process.pid)
    os.kill(server.proxy(), signal.SIGKILL)
    assert server.process.wait(60) == 1
    lines = server.stderr().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the HTTP proxy (caddy) was killed by SIGKILL"), lines
    assert not [pid for pid in left if _alive(pid)]
