"""Serve a model repository with the tritonserver bundled in the nvidia-pytriton wheel.

    python -m serving.server --model-repository model_repository --http-port 8000 --grpc-port 8001 \
        --metrics-port 8002 --host 127.0.0.1

That tritonserver has only the python backend, so the repository is served from a temporary
variant in which every onnxruntime_onnx model (`medoe`) becomes a python model running its
`model.onnx` with onnxruntime (serving/onnx_model.py). The source repository is not modified.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUB_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
UTILS = "triton_python_backend_utils.py"
PATH_BOOTSTRAP = (
    "# Added by serving/server.py: the stub's Python ignores PYTHONPATH.\n"
    "import os as _os, sys as _sys\n"
    "_sys.path += [_p for _p in _os.environ.get('MEDOE_PYTHONPATH', '').split(_os.pathsep) if _p and _p not in _sys.path]\n"
)


class ServerError(RuntimeError):
    pass


def pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError:
        raise ServerError("nvidia-pytriton is not installed; it ships the tritonserver binary: pip install nvidia-pytriton") from None
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def tritonserver_binary() -> Path:
    binary = pytriton_dir() / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerError(f"tritonserver binary not found at {binary}")
    return binary


def assemble_backends(target: Path) -> Path:
    """`target/python/` with the stub built for this Python beside libtriton_python.so.

    The wheel keeps one stub per Python version apart from the backend; the backend looks
    for `triton_python_backend_stub` in its own directory.
    """
    source = pytriton_dir()
    stub = source / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"no python backend stub for Python {STUB_PYTHON} at {stub}")
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in (source / "backends" / "python").iterdir():
        if item.is_file() and item.name != UTILS:
            (python / item.name).symlink_to(item)
    (python / stub.name).symlink_to(stub)
    # The stub runs its embedded Python isolated (PYTHONPATH ignored, sys.flags.isolated=1), so
    # numpy for the backend's own utils, onnxruntime, cv2 and `serving` would not be found.
    # Every model imports the utils module, so it puts MEDOE_PYTHONPATH on sys.path first, at the
    # end: the venv holds an obsolete `typing.py` backport that must not shadow the stdlib's.
    original = (source / "backends" / "python" / UTILS).read_text()
    (python / UTILS).write_text(PATH_BOOTSTRAP + original)
    return target


def _config_text(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def assemble_repository(source: Path, target: Path) -> list[str]:
    """Mirrors `source` under `target` (files linked, not copied); returns the models' names.

    An onnxruntime_onnx model's config gets `backend: "python"` and KIND_CPU instances, and
    its version directories get serving/onnx_model.py as model.py.
    """
    from google.protobuf import text_format

    models = []
    for model in sorted(p for p in source.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file()):
        config = _config_text(model / "config.pbtxt")
        versions = [v for v in model.iterdir() if v.is_dir() and v.name.isdigit()]
        if config.platform == "onnxruntime_onnx" and not any((v / "model.onnx").is_file() for v in versions):
            raise ServerError(f"model {model.name!r} has no <version>/model.onnx in {model}; "
                              f"export one: python -m export.to_onnx --checkpoint ... --out {model}/1/model.onnx")
        shutil.copytree(model, target / model.name, symlinks=True, copy_function=os.symlink)
        if config.platform == "onnxruntime_onnx":
            config.platform, config.backend = "", "python"
            for group in config.instance_group:
                group.kind = group.KIND_CPU
            (target / model.name / "config.pbtxt").unlink()
            (target / model.name / "config.pbtxt").write_text(text_format.MessageToString(config))
            for version in versions:
                shutil.copyfile(ROOT / "serving" / "onnx_model.py", target / model.name / version.name / "model.py")
        models.append(model.name)
    if not models:
        raise ServerError(f"no models (directories with config.pbtxt) in {source}")
    for name in models:  # an ensemble step naming an absent model: say which, before Triton's vaguer error
        steps = _config_text(source / name / "config.pbtxt").ensemble_scheduling.step
        for missing in dict.fromkeys(step.model_name for step in steps if step.model_name not in models):
            raise ServerError(f"ensemble {name!r} needs model {missing!r}, which has no config.pbtxt in {source}; "
                              f"export it: python -m export.to_onnx --checkpoint ... --out {source / missing}/1/model.onnx")
    return models


def server_environment() -> dict[str, str]:
    """The stub embeds the system libpython; it must import numpy, onnxruntime, cv2 and serving from here."""
    env = dict(os.environ)
    libs = pytriton_dir().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    paths = [str(ROOT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env["MEDOE_PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in [*paths, env.get("PYTHONPATH", "")] if p))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class ServerHandle:
    process: subprocess.Popen
    workdir: Path
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    models: list[str] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # Triton drains in-flight requests on SIGTERM
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._end_stubs()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode

    def _end_stubs(self, timeout: float = 5.0) -> None:
        # The python-backend stubs share tritonserver's process group (start_new_session) and
        # notice their parent is gone only at their next health poll: end them now, so that
        # nothing is left running once stop() returns.
        group = self.process.pid
        deadline = time.monotonic() + timeout
        sig = signal.SIGTERM
        while True:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                return
            if time.monotonic() > deadline:
                return  # only unreaped zombies can be left here; they hold no memory or ports
            if sig == signal.SIGTERM and time.monotonic() > deadline - timeout / 2:
                sig = signal.SIGKILL
            time.sleep(0.1)


def start_server(repository: str | Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                 host: str = "127.0.0.1", timeout: float = 120.0, log_file: str | Path | None = None) -> ServerHandle:
    """Starts tritonserver on a variant of `repository` and waits until it is ready."""
    repository = Path(repository).resolve()
    if not repository.is_dir():
        raise ServerError(f"model repository not found: {repository}")
    binary = tritonserver_binary()
    workdir = Path(tempfile.mkdtemp(prefix="medoe-triton-"))
    try:
        backends = assemble_backends(workdir / "backends")
        (workdir / "models").mkdir()
        models = assemble_repository(repository, workdir / "models")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    log_path = Path(log_file) if log_file else workdir / "tritonserver.log"
    command = [str(binary), f"--model-repository={workdir / 'models'}", f"--backend-directory={backends}",
               "--model-control-mode=none", f"--http-address={host}", f"--http-port={http_port}",
               f"--grpc-address={host}", f"--grpc-port={grpc_port}", "--allow-metrics=true", "--allow-gpu-metrics=false",
               f"--metrics-address={host}", f"--metrics-port={metrics_port}", "--exit-on-error=true",
               "--strict-readiness=true", "--exit-timeout-secs=10", "--log-verbose=0"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, env=server_environment(), stdout=log, stderr=subprocess.STDOUT,
                                   cwd=workdir, start_new_session=True)
    handle = ServerHandle(process, workdir, host, http_port, grpc_port, metrics_port, log_path, models)
    deadline = time.monotonic() + timeout
    while not handle.ready():
        if process.poll() is not None or time.monotonic() > deadline:
            reason = f"exited with {process.returncode}" if process.poll() is not None else f"not ready after {timeout:.0f} s"
            handle.stop(5)
            raise ServerError(f"tritonserver {reason}: {_first_error(handle.log_tail(400))}")
        time.sleep(0.2)
    return handle


def _first_error(log: str) -> str:
    """The most telling line of a failed start: a model's load error, else the last error line."""
    lines = log.splitlines()
    loads = [line for line in lines if "failed to load '" in line]
    errors = [line for line in lines if line.startswith("E") or "error" in line.lower()]
    line = (loads[:1] or errors[-1:] or lines[-1:] or ["no log"])[0]
    line = line.split('] "', 1)[-1] if '] "' in line else line  # drop Triton's "E1124 time pid file:line]" prefix
    return line.split("\\n")[0].strip().strip('"')  # the log escapes a traceback's newlines as \n


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument("--log-file", help="tritonserver's log (default: a file in the temporary directory)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        handle = start_server(args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
                              args.host, args.timeout, args.log_file)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)  # main loop below stops the server and exits

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(f"ready: models {', '.join(handle.models)}\n  HTTP    http://{handle.http_url}\n"
          f"  gRPC    {handle.grpc_url}\n  metrics {handle.metrics_url}\n  log     {handle.log_path}", flush=True)
    while not stopping and handle.process.poll() is None:
        time.sleep(0.5)
    if not stopping:
        print(f"error: tritonserver exited with {handle.process.returncode}: {handle.log_tail(1)}", file=sys.stderr)
        handle.stop()
        return 1
    code = handle.stop()
    return 0 if code in (0, -signal.SIGTERM) else 1


if __name__ == "__main__":
    sys.exit(main())
