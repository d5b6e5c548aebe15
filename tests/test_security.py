"""Security defaults, tested: loopback binding, no model control, request size limits, no single
request that takes the server down, no code run from checkpoints.

One real tritonserver for the module, started the way a user starts it (`python -m
serving.server` without --host), on a copy of the test repository whose `segment` has a
small `max_pixels`. Request size: this tritonserver build (the nvidia-pytriton wheel's 2.51)
has no flag that caps an HTTP body or a gRPC message (`--http-max-input-size` came in later
Triton releases); HTTP bodies are capped by the Caddy proxy in front of it (serving/proxy.py),
which also keeps the form-encoded bodies that crash this Triton's libevhtp away from it. The
other limits tested: Triton's shape and batch checks from the model configs and `segment`'s
`max_pixels` (its default is covered by tests/test_serving_bad_input.py; here the configured
value is shown to be the one enforced). The ImageNet-weights path refusing pickled
code is covered by tests/test_backbones.py::test_pickled_code_is_refused, and
load_checkpoint refusing a code-running train_state.pt by tests/test_checkpoint.py."""

import inspect
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")

from export.graph import random_images  # noqa: E402
from medoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from serving import repository as serving_repository  # noqa: E402
from serving import server as serving_server  # noqa: E402
from serving import supervisor as serving_supervisor  # noqa: E402
from serving.processes import cmdline, descendants  # noqa: E402
from tests.test_checkpoint import make  # noqa: E402
from tests.test_serving_server import free_ports, png, repository, segment_request  # noqa: E402, F401
from tests.test_training import config_path  # noqa: E402, F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 5000  # 60x80 = 4800 passes, 100x100 = 10000 does not


# --- the server, started through its CLI with default binding ---------------------------------


@pytest.fixture(scope="module")
def limited_repository(repository, tmp_path_factory) -> Path:  # noqa: F811
    repo = tmp_path_factory.mktemp("security") / "model_repository"
    shutil.copytree(repository, repo)
    config = repo / "segment" / "config.pbtxt"
    text, count = re.subn(
        r'(key: "max_pixels"\s*value: \{ string_value: )"\d+"', rf'\1"{MAX_PIXELS}"', config.read_text()
    )
    assert count == 1, "segment/config.pbtxt has no max_pixels parameter"
    config.write_text(text)
    medoe = repo / "medoe" / "config.pbtxt"  # the same limit for raw tensors sent to `medoe`
    medoe.write_text(
        medoe.read_text() + f'parameters {{\n  key: "max_pixels"\n  value: {{ string_value: "{MAX_PIXELS}" }}\n}}\n'
    )
    return repo


@pytest.fixture(scope="module")
def cli_server(limited_repository, tmp_path_factory):
    http_port, grpc_port, metrics_port = free_ports(3)
    log = tmp_path_factory.mktemp("security-log") / "server.out"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "serving.server",
                "--model-repository",
                str(limited_repository),
                "--http-port",
                str(http_port),
                "--grpc-port",
                str(grpc_port),
                "--metrics-port",
                str(metrics_port),
                "--timeout",
                "90",
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    while "ready: models" not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"python -m serving.server did not become ready: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    yield {"http": http_port, "grpc": grpc_port, "metrics": metrics_port, "process": process}
    tritonserver = descendants(process.pid)
    process.send_signal(signal.SIGTERM)  # the CLI stops tritonserver, then exits
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        for pid in tritonserver:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.kill()
        process.wait()


@pytest.fixture()
def clients(cli_server):
    http = httpclient.InferenceServerClient(f"127.0.0.1:{cli_server['http']}", network_timeout=120)
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{cli_server['grpc']}")
    yield {"http": (httpclient, http), "grpc": (grpcclient, grpc)}
    http.close()
    grpc.close()


def ready(cli_server, model: str = "") -> bool:
    path = f"/v2/models/{model}/ready" if model else "/v2/health/ready"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{cli_server['http']}{path}", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def assert_medoe_answers(module, client) -> None:
    images = random_images(1, 24, 32, seed=11)
    tensor = module.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    assert client.infer("medoe", [tensor]).as_numpy("labels").shape == (1, 24, 32)


# --- loopback binding by default --------------------------------------------------------------


def listening_addresses(port: int) -> set[str]:
    """The local addresses on which some socket of this machine listens on TCP `port`."""
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path("/proc/net") / table
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # the kernel prints 32-bit words
            text = socket.inet_ntop(family, raw)
            found.add(text.removeprefix("::ffff:") if "." in text else text)  # gRPC listens on v4-mapped IPv6
    return found


def non_loopback_addresses() -> list[str]:
    """This machine's own IPv4 addresses other than 127/8 (from the kernel's local routes)."""
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return []
    found, last = [], None
    for line in lines:
        match = re.match(r"\s*\|-- (\d+\.\d+\.\d+\.\d+)$", line)
        if match:
            last = match.group(1)
        elif "/32 host LOCAL" in line and last and not last.startswith("127.") and last not in found:
            found.append(last)
    return found


def test_host_defaults_to_loopback():
    assert serving_server.get_args([]).host == "127.0.0.1"
    assert inspect.signature(serving_supervisor.start_server).parameters["host"].default == "127.0.0.1"


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads the kernel's socket table (Linux)")
def test_the_socket_table_check_sees_a_wildcard_bind():
    # The check below must be able to fail: a socket on all interfaces is reported as such.
    with socket.socket() as wildcard, socket.socket() as loopback:
        wildcard.bind(("0.0.0.0", 0))
        wildcard.listen()
        loopback.bind(("127.0.0.1", 0))
        loopback.listen()
        assert listening_addresses(wildcard.getsockname()[1]) == {"0.0.0.0"}
        assert listening_addresses(loopback.getsockname()[1]) == {"127.0.0.1"}
        for address in non_loopback_addresses()[:1]:
            socket.create_connection((address, wildcard.getsockname()[1]), timeout=5).close()


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads the kernel's socket table (Linux)")
def test_cli_server_listens_on_loopback_only(cli_server):
    for name in ("http", "grpc", "metrics"):
        port = cli_server[name]
        assert listening_addresses(port) == {"127.0.0.1"}, f"{name} port {port}"
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        for address in non_loopback_addresses():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=5).close()


# --- the model-control API is off -------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("action", ["load_model", "unload_model"])
def test_model_control_is_refused_and_medoe_stays_ready(cli_server, clients, protocol, action):
    module, client = clients[protocol]
    with pytest.raises(module.InferenceServerException) as error:
        getattr(client, action)("medoe")
    assert "not allowed" in error.value.message(), error.value.message()
    assert client.is_model_ready("medoe") and ready(cli_server, "medoe")
    assert_medoe_answers(module, client)


# --- request size ------------------------------------------------------------------------------


def test_this_tritonserver_has_no_request_size_flag():
    # HTTP bodies are capped by the proxy (--max-request-bytes). If a newer wheel brings a flag
    # (Triton's later `--http-max-input-size`), this fails: pass the same cap to tritonserver.
    result = subprocess.run(
        [str(serving_repository.tritonserver_binary()), "--help"],
        capture_output=True,
        text=True,
        env=serving_repository.server_environment(),
        timeout=60,
    )
    help_text = result.stdout + result.stderr  # this build prints its usage to stderr
    flags = set(re.findall(r"^\s+(--[a-z0-9-]+)", help_text, re.MULTILINE))
    assert {"--http-port", "--grpc-port", "--model-control-mode"} <= flags, help_text[:500]
    assert not [f for f in flags if re.search(r"max-(input|request|message|body)|(input|request|message|body)-size", f)]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_configured_max_pixels_is_enforced(cli_server, clients, protocol):
    module, client = clients[protocol]
    small = random_images(1, 60, 80, seed=2)[0]  # 4800 pixels: under the configured 5000
    assert client.infer("segment", segment_request(module, png(small))).as_numpy("labels").shape == (60, 80)
    with pytest.raises(module.InferenceServerException) as error:
        client.infer("segment", segment_request(module, png(random_images(1, 100, 100, seed=2)[0])))
    assert "100x100, over the limit of 5000 pixels" in error.value.message(), error.value.message()
    big = module.InferInput("images", [1, 100, 100, 3], "UINT8")  # raw tensors straight to `medoe`
    big.set_data_from_numpy(random_images(1, 100, 100, seed=3))
    with pytest.raises(module.InferenceServerException) as error:
        client.infer("medoe", [big])
    assert "images is 100x100, over the limit of 5000 pixels" in error.value.message(), error.value.message()
    assert ready(cli_server) and ready(cli_server, "segment")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_batch_and_image_count_limits_from_the_configs(cli_server, clients, protocol):
    module, client = clients[protocol]
    images = np.zeros((9, 8, 8, 3), np.uint8)  # medoe's max_batch_size is 8
    tensor = module.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    with pytest.raises(module.InferenceServerException, match="batch-size must be <= 8"):
        client.infer("medoe", [tensor])
    two = module.InferInput("image", [2], "BYTES")  # segment takes one encoded image per request
    two.set_data_from_numpy(np.array([png(images[0]), png(images[1])], dtype=object))
    with pytest.raises(
        module.InferenceServerException, match=r"unexpected shape for input 'image'.*Expected \[1\], got \[2\]"
    ):
        client.infer("segment", [two])
    assert ready(cli_server)
    assert_medoe_answers(module, client)


def test_a_body_over_the_proxy_limit_is_413_and_the_server_stays_ready(cli_server, clients):
    # The proxy caps HTTP bodies (serving/proxy.py, 64 MiB by default); tritonserver never sees them.
    module, client = clients["http"]
    with pytest.raises(module.InferenceServerException) as error:
        client.infer("segment", segment_request(module, b"\x00" * (65 << 20)))
    assert str(error.value.status()) == "413", (error.value.status(), error.value.message())
    assert ready(cli_server)
    assert_medoe_answers(module, client)


def test_a_body_under_the_limit_reaches_segment(cli_server, clients):
    module, client = clients["http"]
    with pytest.raises(module.InferenceServerException) as error:
        client.infer("segment", segment_request(module, b"\x00" * (20 << 20)))
    assert str(error.value.status()) == "400" and "not an image" in error.value.message(), error.value.message()


# --- one request never takes the server down: the HTTP shield -----------------------------------

FORM_BOMB = b"\x00" * 5_000_000  # libevhtp parsed such a form body on its stack: SIGSEGV from ~4.2 MB


def raw_post(port: int, path: str, body: bytes, content_type: str) -> int | None:
    """POSTs `body` as curl --data-binary does (its default Content-Type is form-encoded); the
    status, or None when the server answered before reading the body and reset the connection."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except urllib.error.URLError as error:
        if isinstance(error.reason, ConnectionResetError | BrokenPipeError):
            return None
        raise


def tritonserver_pid(cli: subprocess.Popen) -> int:
    return next(p for p in descendants(cli.pid) if cmdline(p)[0].endswith("/tritonserver"))


def tcp_listen_ports(pid: int) -> set[int]:
    """TCP ports on which process `pid` itself holds a listening socket (its fds x /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path("/proc/net", table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "APPLICATION/X-WWW-FORM-URLENCODED; charset=utf-8"]
)
@pytest.mark.parametrize(
    "where",
    [
        ("http", "/v2/models/segment/infer"),
        ("http", "/v2/models/medoe/infer"),
        ("metrics", "/metrics"),
        ("http", "/v2/health/ready"),
    ],
)
def test_a_form_encoded_body_does_not_kill_the_server(cli_server, clients, where, content_type):
    port_name, path = where
    status = raw_post(cli_server[port_name], path, FORM_BOMB, content_type)
    if port_name == "metrics":  # refused (404) before the body is read: the answer may be lost in the reset
        assert status in (404, None), status
    else:  # answered (Triton's own 4xx/5xx for a body that is no request)
        assert status is not None and 400 <= status < 600, status
    assert cli_server["process"].poll() is None, "serving.server exited"
    assert ready(cli_server)
    assert_medoe_answers(*clients["grpc"])


def test_the_metrics_port_serves_get_metrics_only(cli_server):
    with urllib.request.urlopen(f"http://127.0.0.1:{cli_server['metrics']}/metrics", timeout=10) as response:
        assert response.status == 200 and b"nv_inference_request_success" in response.read()
    assert raw_post(cli_server["metrics"], "/metrics", b"x", "text/plain") == 404
    assert raw_post(cli_server["metrics"], "/v2/health/ready", b"", "text/plain") == 404


def test_a_huge_request_line_is_refused_by_the_proxy(cli_server):
    with socket.create_connection(("127.0.0.1", cli_server["http"]), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/ready?" + b"a" * 3_000_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = sock.recv(64)
    assert answer.startswith(b"HTTP/1.1 431") or answer.startswith(b"HTTP/1.1 414"), answer
    assert ready(cli_server)


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads the kernel's socket table (Linux)")
def test_tritonserver_listens_on_tcp_only_for_grpc(cli_server):
    # HTTP and metrics reach tritonserver only through the proxy's Unix sockets.
    assert tcp_listen_ports(tritonserver_pid(cli_server["process"])) == {cli_server["grpc"]}


# --- checkpoints never unpickle code ----------------------------------------------------------


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('pwned')",))


def payloads(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A raw pickle and a torch.save file that both run code when unpickled, and the marker
    file that code writes; both are first shown to work against an unsafe loader."""
    marker = tmp_path / "PWNED"
    raw, saved = tmp_path / "raw.pkl", tmp_path / "saved.pt"
    raw.write_bytes(pickle.dumps({"state": RunsCode(marker)}))
    torch.save({"state": RunsCode(marker)}, saved)
    pickle.loads(raw.read_bytes())
    assert marker.exists()
    marker.unlink()
    torch.load(saved, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return raw, saved, marker


def test_a_pickled_model_file_is_refused_without_running_it(tmp_path):
    raw, saved, marker = payloads(tmp_path)
    model, stats = make()
    for payload in (raw, saved):
        save_checkpoint(tmp_path / "ckpt", model, stats, {"iter": 1})
        shutil.copyfile(payload, tmp_path / "ckpt" / "model.safetensors")
        with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
            load_checkpoint(tmp_path / "ckpt", train_state=True)
        assert not marker.exists()


@pytest.mark.parametrize("command", ["training.evaluate", "export.to_onnx", "training.train --resume"])
def test_cli_refuses_a_code_running_checkpoint(tmp_path, config_path, command):  # noqa: F811
    _, saved, marker = payloads(tmp_path)
    model, stats = make()
    if command == "training.train --resume":  # the only command that reads train_state.pt
        checkpoint, victim = tmp_path / "work" / "last", "train_state.pt"
        args = [
            "-m",
            "training.train",
            "--config",
            config_path,
            "--work-dir",
            str(tmp_path / "work"),
            "--resume",
            "--no-eval",
        ]
    else:
        checkpoint, victim = tmp_path / "ckpt", "model.safetensors"
        args = ["-m", command, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out.file")]
    save_checkpoint(checkpoint, model, stats, {"stage": 1, "iter": 1})
    shutil.copyfile(saved, checkpoint / victim)
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=180)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and str(checkpoint / victim) in lines[0], lines[0]
    assert "Traceback" not in result.stderr and not marker.exists()
    assert not (tmp_path / "out.file").exists() and not (tmp_path / "work" / "final").exists()
