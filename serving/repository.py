"""What the tritonserver bundled in the nvidia-pytriton wheel needs to serve a model repository:
its binary, a backend directory, a variant of the repository, and the stubs' environment.

That tritonserver has only the python backend, so the repository is served from a temporary
variant in which every onnxruntime_onnx model (`medoe`) becomes a python model running its
`model.onnx` with onnxruntime (serving/onnx_model.py). The source repository is not modified.
serving/supervisor.py starts tritonserver on what this module assembles.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUB_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
UTILS = "triton_python_backend_utils.py"
PATH_BOOTSTRAP = (
    "# Added by serving/repository.py: the stub's Python ignores PYTHONPATH.\n"
    "import os as _os, sys as _sys\n"
    "_sys.path += [_p for _p in _os.environ.get('MEDOE_PYTHONPATH', '').split(_os.pathsep)"
    " if _p and _p not in _sys.path]\n"
)


class ServerError(RuntimeError):
    """The bundled tritonserver cannot be set up, started or kept running; the message is one line for the user."""


def pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError:
        raise ServerError(
            "nvidia-pytriton is not installed; it ships the tritonserver binary: pip install nvidia-pytriton"
        ) from None
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


def read_model_config(path: Path):
    """A model's config.pbtxt as a ModelConfig message."""
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
        config = read_model_config(model / "config.pbtxt")
        versions = [v for v in model.iterdir() if v.is_dir() and v.name.isdigit()]
        if config.platform == "onnxruntime_onnx" and not any((v / "model.onnx").is_file() for v in versions):
            raise ServerError(
                f"model {model.name!r} has no <version>/model.onnx in {model}; "
                f"export one: python -m export.to_onnx --checkpoint ... --out {model}/1/model.onnx"
            )
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
    return models


def server_environment() -> dict[str, str]:
    """The stub embeds the system libpython; it must import numpy, onnxruntime, cv2 and serving from here
    (PATH_BOOTSTRAP reads MEDOE_PYTHONPATH)."""
    env = dict(os.environ)
    libs = pytriton_dir().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    paths = [str(ROOT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    env["MEDOE_PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in [*paths, env.get("PYTHONPATH", "")] if p))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
