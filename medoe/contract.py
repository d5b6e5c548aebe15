"""The wire contract (SPEC §9): every model, tensor and metadata name shared by the exported
graph, the Triton configs, the python models, the client and the demo, and the one way the
metadata is written and read back.

Torch-free and dependency-free (the standard library only), so the request path, the client and
the Triton image import it without the training stack.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# --- models of the served repository --------------------------------------------------------
MODEL = "medoe"  # the fused graph; its config carries the metadata below as `parameters`
SEGMENT = "segment"  # encoded image in, drawn results out: one python model calling MODEL by BLS

# --- the fused graph's tensors ----------------------------------------------------------------
IMAGES = "images"  # uint8 [N, H, W, 3] RGB 0..255; normalisation is inside the graph
LABELS = "labels"  # uint8 [N, H, W] class ids
CONFIDENCE = "confidence"  # float32 [N, H, W], max of the final class probabilities
EXPERT_WEIGHTS = "expert_weights"  # float32 [N, K, h, w], the decision maker's weights (MEDOE only)
PROBS = "probs"  # float32 [N, C, H, W], the final class probabilities (opt-in)
GRAPH_OUTPUTS = (LABELS, CONFIDENCE, EXPERT_WEIGHTS, PROBS)
DEFAULT_OUTPUTS = (LABELS, CONFIDENCE, EXPERT_WEIGHTS)  # a baseline graph has no expert_weights
# Axis names of the dynamic dimensions; expert_weights' h, w are the decoder's resolution.
DYNAMIC_AXES = {
    IMAGES: {0: "batch", 1: "height", 2: "width"},
    LABELS: {0: "batch", 1: "height", 2: "width"},
    CONFIDENCE: {0: "batch", 1: "height", 2: "width"},
    EXPERT_WEIGHTS: {0: "batch", 2: "feature_height", 3: "feature_width"},
    PROBS: {0: "batch", 2: "height", 3: "width"},
}

# --- the `segment` model's tensors -----------------------------------------------------------
IMAGE = "image"  # BYTES [1]: one encoded JPEG / PNG / BMP / WebP
OVERLAY = "overlay"  # uint8 [H, W, 3] RGB, the colour mask blended over the image
CLASS_SHARE = "class_share"  # float32 [C], fraction of the pixels per class
SEGMENT_OUTPUTS = (LABELS, OVERLAY, CLASS_SHARE, CONFIDENCE, EXPERT_WEIGHTS)  # batch axis dropped
# `segment`'s own Triton metrics (counters), read back by bench/serving.py: microseconds summed
# per phase of an answer, and the answers they cover.
SEGMENT_PHASE_METRIC = "medoe_segment_phase_us"  # label `phase`: one of SEGMENT_PHASES
SEGMENT_ANSWERS_METRIC = "medoe_segment_answers"
SEGMENT_PHASES = ("decode", "model", "draw", "send")


class MetadataError(ValueError):
    """Metadata that is missing a key or holds a value of the wrong shape."""


@dataclass(frozen=True)
class ModelMetadata:
    """What a served graph says about itself: written into the ONNX `metadata_props` by export,
    copied into the Triton config's `parameters`, read back by the client, `segment` and the demo."""

    model_type: str  # medoe | baseline | focal | reweight
    backbone: str
    context: str
    num_classes: int
    class_names: list[str]  # C names, index order
    palette: list[list[int]]  # C RGB colours, index order
    groups: dict[str, list[int]]  # head/body/tail class ids at `group_thresholds`: what reports average over
    group_thresholds: list[float]
    num_experts: int  # K, 0 for a single-decoder model
    expert_groups: list[list[int]]  # expert k's own classes (K lists): what each expert really owns
    outputs: list[str]  # the graph's outputs, in order
    input: str = f"{IMAGES}: uint8 [N, H, W, 3] RGB 0..255 (normalisation is inside the graph)"
    extra: dict[str, str] = field(default_factory=dict)  # any other key, kept as its string

    def to_props(self) -> dict[str, str]:
        """Every value a string (ONNX metadata and Triton parameters hold strings), JSON where structured."""
        values = asdict(self)
        extra = values.pop("extra")
        props = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
        return {**props, **extra}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model metadata") -> ModelMetadata:
        known = [name for name in cls.__dataclass_fields__ if name != "extra"]
        missing = [k for k in ("class_names", "palette", "num_classes") if k not in props]
        if missing:
            raise MetadataError(f"{source} has no {', '.join(missing)}: export the graph with export.to_onnx")
        values: dict = {}
        for name in known:
            if name not in props:
                continue
            text = props[name]
            try:
                values[name] = text if name in ("model_type", "backbone", "context", "input") else json.loads(text)
            except json.JSONDecodeError:
                raise MetadataError(f"{source}: `{name}` is not valid JSON: {text[:80]!r}") from None
        names, palette = values["class_names"], values["palette"]
        if len(palette) != values["num_classes"] or len(names) != values["num_classes"]:
            raise MetadataError(
                f"{source}: {len(names)} class names and {len(palette)} colours for num_classes={values['num_classes']}"
            )
        values.setdefault("model_type", "unknown")
        values.setdefault("backbone", "unknown")
        values.setdefault("context", "unknown")
        values.setdefault("groups", {})
        values.setdefault("group_thresholds", [])
        values.setdefault("num_experts", 0)
        values.setdefault("expert_groups", [])
        values.setdefault("outputs", [])
        values["groups"] = {str(k): [int(c) for c in v] for k, v in values["groups"].items()}
        values["expert_groups"] = [[int(c) for c in v] for v in values["expert_groups"]]
        extra = {k: v for k, v in props.items() if k not in known}
        return cls(**values, extra=extra)


def triton_parameters(model_config: dict) -> dict[str, str]:
    """A Triton model config's `parameters` as strings: the JSON config a python model gets in
    `initialize`, and what `get_model_config` returns over HTTP and (as_json, unwrapped) gRPC."""
    config = model_config.get("config", model_config)  # gRPC's JSON wraps the config
    return {str(k): str(v.get("string_value", "")) for k, v in config.get("parameters", {}).items()}


def read_graph_metadata(model, source: str = "the ONNX graph") -> ModelMetadata:
    """From an `onnx.ModelProto` (load it with `onnx.load(path, load_external_data=False)`)."""
    return ModelMetadata.from_props(graph_props(model), source)


def graph_props(model) -> dict[str, str]:
    """The raw string metadata of an `onnx.ModelProto`."""
    return {p.key: p.value for p in model.metadata_props}
