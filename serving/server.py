"""Serve a model repository with the tritonserver bundled in the nvidia-pytriton wheel.

    python -m serving.server --model-repository model_repository --http-port 8000 --grpc-port 8001 \
        --metrics-port 8002 --host 127.0.0.1

That tritonserver has only the python backend, so the repository is served from a temporary
variant in which every onnxruntime_onnx model (`medoe`) becomes a python model running its
`model.onnx` with onnxruntime (serving/onnx_model.py). The source repository is not modified.

HTTP and metrics reach clients through Caddy (serving/proxy.py says why: one form-encoded body
of 4.2 MB kills this Triton); tritonserver itself listens for them only on Unix sockets in the
server's private temporary directory. gRPC is tritonserver's own port.

A dead python-backend stub (killed, OOM) is not restarted by this Triton (2.51): the server stays
"ready" and answers every request to that model with HTTP 500 / gRPC INTERNAL "Stub process
'<model>_0_0' is not healthy." The CLI watches the stubs and treats a dead one like an exit of
tritonserver: with --restart it kills tritonserver and starts it again on the same ports (at most
--max-restarts times within --restart-window seconds), without it it stops and exits 1.
"""

from __future__ import annotations

import argparse
import collections
import json
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

from serving.processes import (
    alive_child,
    child_processes,
    die_with_parent,
    exit_reason,
    stub_instance,
)
from serving.proxy import DEFAULT_MAX_REQUEST_BYTES, ProxyError, caddy_binary, caddy_config

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
    command: list[str] = field(default_factory=list)  # tritonserver's argv, for restart()
    stubs: dict[int, tuple[str, str]] = field(default_factory=dict)  # pid -> (instance, shm region), once ready
    proxy: subprocess.Popen | None = None  # Caddy, serving HTTP and metrics (serving/proxy.py)
    proxy_command: list[str] = field(default_factory=list)

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

    def wait_ready(self, timeout: float, abort=lambda: False) -> None:
        """Waits for readiness, then records the stubs; raises ServerError (the caller stops the server)."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proxy_exited():
                self._find_stubs()
                raise ServerError(self.proxy_failure())
            if self.process.poll() is not None or time.monotonic() > deadline or abort():
                if self.process.poll() is not None:
                    reason = exit_reason(self.process.returncode)
                    if self.process.returncode > 0:  # a killed server's log tells nothing about why
                        reason += f": {_first_error(self.log_tail(400))}"
                else:
                    reason = "start interrupted" if abort() else f"not ready after {timeout:.0f} s: {_first_error(self.log_tail(400))}"
                self._find_stubs()  # those started so far, so that stop() or restart() removes their shm regions
                raise ServerError(f"tritonserver {reason}")
            time.sleep(0.2)
        self._find_stubs()  # every model is loaded once ready (--model-control-mode=none): every stub exists now

    def _find_stubs(self) -> None:
        self.stubs = {pid: (name, argv[2]) for pid, argv in child_processes(self.process.pid).items()
                      if (name := stub_instance(argv))}

    def proxy_failure(self) -> str:
        """How the proxy ended, with the reason in Caddy's log (JSON lines: {"level": "error", "msg": ..., "error": ...})."""
        try:
            lines = (self.workdir / "caddy.log").read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        reason = lines[-1] if lines else "no log"
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                reason = str(entry.get("error") or entry.get("msg"))
                break
        return f"the HTTP proxy (caddy) {exit_reason(self.proxy.returncode)}: {reason}"

    def proxy_exited(self) -> bool:
        return self.proxy is not None and self.proxy.poll() is not None

    def restart_proxy(self) -> None:
        self.proxy = _spawn(self.proxy_command, self.workdir / "caddy.log", self.workdir, _proxy_environment(self.workdir))

    def dead_stubs(self) -> list[str]:
        """Model instances (e.g. `medoe_0_0`) whose python-backend stub has died since the server got ready."""
        return [name for pid, (name, _) in self.stubs.items() if not alive_child(pid, self.process.pid)]

    def restart(self, timeout: float = 120.0, abort=lambda: False) -> None:
        """Kills tritonserver and its stubs and starts it again with the same command: same ports and repository.

        SIGKILL, not SIGTERM: after a stub died, SIGTERM waits the whole --exit-timeout-secs for
        the model that cannot unload, and requests in flight fail either way (clients retry).
        """
        if self.process.poll() is None and not self.dead_stubs() and self.proxy_exited():
            self.restart_proxy()  # only the proxy died: tritonserver keeps its loaded models
            self.wait_ready(timeout, abort)
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._end_stubs()
        self._remove_shm()
        for socket_path in self.workdir.glob("*.sock"):  # a Unix socket left behind blocks the new bind
            socket_path.unlink(missing_ok=True)
        if self.proxy_exited():
            self.restart_proxy()
        self.process = _spawn(self.command, self.log_path, self.workdir)
        self.wait_ready(timeout, abort)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # Triton drains in-flight requests on SIGTERM
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._end_stubs()
        self._remove_shm()
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.terminate()  # in-flight requests have ended with tritonserver
            try:
                self.proxy.wait(5)
            except subprocess.TimeoutExpired:
                self.proxy.kill()
                self.proxy.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return self.process.returncode

    def _remove_shm(self) -> None:
        # Triton unlinks a stub's /dev/shm region when it unloads the model; after a SIGKILL, or
        # a dead stub whose model cannot unload, nobody does, and each leaks (MiBs, until reboot).
        for _, region in self.stubs.values():
            Path("/dev/shm", region).unlink(missing_ok=True)

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
                 host: str = "127.0.0.1", timeout: float = 120.0, log_file: str | Path | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> ServerHandle:
    """Starts tritonserver on a variant of `repository`, and Caddy in front of its HTTP and
    metrics, and waits until it is ready."""
    repository = Path(repository).resolve()
    if not repository.is_dir():
        raise ServerError(f"model repository not found: {repository}")
    binary = tritonserver_binary()
    try:
        caddy = caddy_binary()
    except ProxyError as err:
        raise ServerError(str(err)) from None
    if max_request_bytes < 1:
        raise ServerError(f"max request size {max_request_bytes} must be positive")
    workdir = Path(tempfile.mkdtemp(prefix="medoe-triton-"))  # mode 0700: only this user reaches the sockets
    try:
        backends = assemble_backends(workdir / "backends")
        (workdir / "models").mkdir()
        models = assemble_repository(repository, workdir / "models")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    log_path = Path(log_file) if log_file else workdir / "tritonserver.log"
    http_socket, metrics_socket = workdir / "http.sock", workdir / "metrics.sock"
    # libevhtp binds "unix:PATH" addresses (the port is ignored): no TCP port reaches Triton's HTTP.
    command = [str(binary), f"--model-repository={workdir / 'models'}", f"--backend-directory={backends}",
               "--model-control-mode=none", f"--http-address=unix:{http_socket}", "--http-port=0",
               f"--grpc-address={host}", f"--grpc-port={grpc_port}", "--allow-metrics=true", "--allow-gpu-metrics=false",
               f"--metrics-address=unix:{metrics_socket}", "--metrics-port=0", "--exit-on-error=true",
               "--strict-readiness=true", "--exit-timeout-secs=10", "--log-verbose=0",
               # Each stub's shared-memory pool starts at 1 MiB and grows 1 MiB at a time; one
               # 512x1024 answer moves ~4.5 MB through it, so start it where it ends up anyway.
               "--backend-config=python,shm-default-byte-size=33554432",
               "--backend-config=python,shm-growth-byte-size=16777216"]
    listen = f"[{host}]" if ":" in host else host
    config = caddy_config(f"{listen}:{http_port}", f"{listen}:{metrics_port}", str(http_socket), str(metrics_socket),
                          max_request_bytes)
    (workdir / "caddy.json").write_text(json.dumps(config))
    proxy_command = [str(caddy), "run", "--config", str(workdir / "caddy.json")]
    handle = ServerHandle(_spawn(command, log_path, workdir), workdir, host, http_port, grpc_port, metrics_port,
                          log_path, models, command, proxy_command=proxy_command)
    handle.restart_proxy()
    try:
        handle.wait_ready(timeout)
    except ServerError:
        handle.stop(5)
        raise
    return handle


def _proxy_environment(workdir: Path) -> dict[str, str]:
    # Caddy keeps certificates and autosaved configs under HOME/XDG dirs: keep it in the workdir.
    return dict(os.environ, HOME=str(workdir), XDG_DATA_HOME=str(workdir / "xdg"), XDG_CONFIG_HOME=str(workdir / "xdg"))


def _spawn(command: list[str], log_path: Path, workdir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    # PR_SET_PDEATHSIG ties the child to the *thread* that forks it: start servers from a
    # thread that lives as long as they should (the main thread everywhere in this project).
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=env or server_environment(), stdout=log, stderr=subprocess.STDOUT,
                                cwd=workdir, start_new_session=True, preexec_fn=die_with_parent(os.getpid()))


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
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="larger HTTP request bodies are answered 413 by the proxy")
    parser.add_argument("--log-file", help="tritonserver's log (default: a file in the temporary directory)")
    parser.add_argument("--restart", action="store_true",
                        help="start tritonserver again when it exits unexpectedly or a python-backend stub dies")
    parser.add_argument("--max-restarts", type=int, default=5, help="with --restart: give up (exit 1) after this many ...")
    parser.add_argument("--restart-window", type=float, default=60.0, help="... restarts within this many seconds")
    args = parser.parse_args(argv)
    if args.max_restarts < 0 or args.restart_window <= 0:
        parser.error("--max-restarts must be >= 0 and --restart-window > 0")
    if args.max_request_bytes < 1:
        parser.error("--max-request-bytes must be positive")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        handle = start_server(args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
                              args.host, args.timeout, args.log_file, args.max_request_bytes)
    except ServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)  # main loop below stops the server and exits

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(f"ready: models {', '.join(handle.models)}\n  HTTP    http://{handle.http_url} (through caddy)\n"
          f"  gRPC    {handle.grpc_url}\n  metrics {handle.metrics_url}\n  log     {handle.log_path}", flush=True)
    restarts: collections.deque[float] = collections.deque()  # times of the restarts within the window
    failure = None
    while not stopping:
        if failure is None and handle.process.poll() is not None:
            failure = f"tritonserver {exit_reason(handle.process.returncode)}"
            if handle.process.returncode > 0:
                failure += f": {handle.log_tail(1)}"
        elif failure is None and handle.proxy_exited():
            failure = handle.proxy_failure()
        elif failure is None and (dead := handle.dead_stubs()):
            failure = f"python-backend stub of {', '.join(dead)} died; Triton 2.51 does not restart it"
        elif failure is None:
            time.sleep(0.5)
            continue
        while restarts and restarts[0] < time.monotonic() - args.restart_window:
            restarts.popleft()
        if not args.restart or len(restarts) >= args.max_restarts:
            limit = f" ({len(restarts)} restarts within {args.restart_window:.0f} s)" if args.restart else ""
            print(f"error: {failure}{limit}", file=sys.stderr, flush=True)
            handle.stop(2)  # short: with a dead stub, Triton's SIGTERM waits its whole exit timeout in vain
            return 1
        restarts.append(time.monotonic())
        backoff = min(0.5 * 2 ** (len(restarts) - 1), 8.0)  # a crash loop must not spin
        print(f"restart: {failure}; starting it again on the same ports in {backoff:.1f} s "
              f"({len(restarts)}/{args.max_restarts} within {args.restart_window:.0f} s)", file=sys.stderr, flush=True)
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            handle.restart(args.timeout, abort=lambda: bool(stopping))
            failure = None
        except ServerError as err:  # e.g. killed again while starting: one more failure towards the cap
            failure = f"restart failed: {err}"
    code = handle.stop()
    return 0 if code in (0, -signal.SIGTERM) else 1


if __name__ == "__main__":
    sys.exit(main())
