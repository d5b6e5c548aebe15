"""The Dockerfile serves what model_repository/ holds, with pins pyproject.toml allows.

Static checks only: CI has no Docker engine.
"""

import re
import tomllib
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
            pins += [Requirement(token) for token in run.split("pip install", 1)[1].split() if not token.startswith("-")]
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
        steps = re.findall(r'model_name:\s*"([^"]+)"', config.read_text())
        for step in steps:
            assert step in models - {GENERATED} and (ROOT / "model_repository" / step / "config.pbtxt").is_file() \
                or step == GENERATED, f"ensemble {name} needs {step}, which is not in model_repository/"
        if (ROOT / "model_repository" / name / "1" / "model.py").exists():
            assert 'backend: "python"' in config.read_text()


def test_generated_model_is_documented_and_checked_at_build():
    text = (ROOT / "Dockerfile").read_text()
    assert "python -m export.to_onnx" in text and "model_repository/medoe/1/model.onnx" in text
    assert any("test -f /models/medoe/1/model.onnx" in run and "/models/medoe/config.pbtxt" in run for run in arguments("RUN"))


def test_python_models_find_what_they_import():
    copied = " ".join(arguments("COPY"))
    for model in (ROOT / "model_repository").glob("*/1/model.py"):
        for module in re.findall(r"^from (serving\.\w+) import", model.read_text(), re.M):
            assert module.replace(".", "/") + ".py" in copied, f"{model} imports {module}, not copied"
        if "tritonclient" in model.read_text():
            assert any(canonicalize_name(p.name) == "tritonclient" for p in pip_pins())
    assert "serving/__init__.py" in copied


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
    assert "tritonserver" in command and "--model-repository=/models" in command and "--model-control-mode=none" in command


@pytest.mark.parametrize("name", ["preprocess", "postprocess", "segment"])
def test_hand_written_models_are_present(name):
    assert (ROOT / "model_repository" / name / "config.pbtxt").is_file()
