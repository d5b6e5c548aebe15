"""What the demo draws from a served answer, as plain numpy and HTML (testable without Gradio).

Every name, colour and group comes from the model's metadata (`serving.client.Metadata`);
nothing here knows the classes of a particular model. Experts are described by what each one
owns (`expert_groups`); the head/body/tail `groups` are the report's frequency split at fixed
thresholds, and name an expert only when it owns exactly one of them.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import cv2
import numpy as np

from serving.client import Metadata
from serving.processing import overlay, resize_map

# Okabe-Ito colours, one per expert: distinguishable with the common colour-vision deficiencies,
# and none of them is a Cityscapes class colour, so the expert map is never read as a class map.
EXPERT_COLOURS = ((0, 114, 178), (0, 158, 115), (213, 94, 0), (204, 121, 167), (230, 159, 0))


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb[:3]))


def group_of_classes(meta: Metadata) -> dict[int, str]:
    """Class id -> its frequency group (head, body, tail) in the report's split."""
    return {c: name for name, classes in meta.groups.items() for c in classes}


def expert_of_classes(meta: Metadata) -> dict[int, int]:
    """Class id -> the expert k that owns it."""
    return {c: k for k, classes in enumerate(meta.expert_groups) for c in classes}


def expert_classes(meta: Metadata, k: int) -> list[int]:
    """Expert k's own classes, most frequent first where the groups give the rank (else by id)."""
    owned = meta.expert_groups[k] if k < len(meta.expert_groups) else []
    rank = {c: i for i, c in enumerate(c for classes in meta.groups.values() for c in classes)}
    return sorted(owned, key=lambda c: (rank.get(c, len(rank)), c))


def expert_group(meta: Metadata, k: int) -> str | None:
    """The frequency group whose classes are exactly expert k's, if one is."""
    owned = set(expert_classes(meta, k))
    return next((name for name, classes in meta.groups.items() if owned and set(classes) == owned), None)


def expert_title(meta: Metadata, k: int) -> str:
    """`head expert` when expert k owns exactly the head group, else `expert 2` (1-based)."""
    group = expert_group(meta, k)
    return f"{group} expert" if group else f"expert {k + 1}"


def class_list(meta: Metadata, classes: Sequence[int], limit: int | None = None) -> str:
    """`car, bus, +3`: the first `limit` class names and how many more."""
    names = [meta.class_names[c] for c in classes]
    if limit is not None and len(names) > limit:
        return ", ".join(names[:limit]) + f", +{len(names) - limit}"
    return ", ".join(names)


def expert_names(meta: Metadata, num_experts: int | None = None) -> list[str]:
    """One name per expert, standing alone: `head expert`, or what it owns: `expert 2: car, bus, +3`."""
    names = []
    for k in range(meta.num_experts if num_experts is None else num_experts):
        title, classes = expert_title(meta, k), expert_classes(meta, k)
        names.append(title if expert_group(meta, k) or not classes else f"{title}: {class_list(meta, classes, 2)}")
    return names


def experts_line(meta: Metadata) -> str:
    """The experts for the status line: `3 experts (head expert; body expert; tail expert)`."""
    if not meta.num_experts:
        return "one decoder"
    return f"{meta.num_experts} experts ({'; '.join(expert_names(meta))})"


def class_colour_map(meta: Metadata) -> dict[str, str]:
    return {name: hex_colour(meta.palette[c]) for c, name in enumerate(meta.class_names)}


def shown_overlay(
    image: np.ndarray, labels: np.ndarray, meta: Metadata, alpha: float, shown: Sequence[str] | None
) -> np.ndarray:
    """The colour overlay; pixels of classes not in `shown` keep the plain image."""
    blended = overlay(image, labels, meta.palette, alpha)
    hidden = [c for c, name in enumerate(meta.class_names) if shown is not None and name not in shown]
    if hidden:
        mask = np.isin(labels, hidden)
        blended[mask] = image[mask]
    return blended


def annotations(labels: np.ndarray, meta: Metadata, shown: Sequence[str] | None) -> list[tuple[np.ndarray, str]]:
    """(mask, class name) pairs for gr.AnnotatedImage: the classes present and shown, largest first."""
    counts = np.bincount(labels.ravel(), minlength=len(meta.class_names))[: len(meta.class_names)]
    pairs = []
    for c in np.argsort(counts)[::-1]:
        name = meta.class_names[c]
        if counts[c] and (shown is None or name in shown):
            pairs.append(((labels == c).astype(np.float32), name))
    return pairs


def confidence_image(confidence: np.ndarray) -> np.ndarray:
    """Max class probability per pixel as viridis RGB: dark purple = unsure, yellow = sure."""
    scaled = np.clip(np.rint(np.asarray(confidence, np.float32) * 255), 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_VIRIDIS), cv2.COLOR_BGR2RGB)


def expert_image(weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[K, h, w] MOE weights -> RGB [H, W, 3]: each pixel mixes the experts' colours by weight."""
    if weights.ndim != 3 or weights.shape[0] > len(EXPERT_COLOURS):
        raise ValueError(f"expert_weights must be [K, h, w] with K <= {len(EXPERT_COLOURS)}, got {weights.shape}")
    colours = np.asarray(EXPERT_COLOURS[: weights.shape[0]], np.float32)
    resized = np.stack([resize_map(w, size) for w in weights], axis=-1)  # [H, W, K]
    return np.clip(np.rint(resized @ colours), 0, 255).astype(np.uint8)


def expert_summary_html(weights: np.ndarray, meta: Metadata) -> str:
    """One line per expert: its colour, its name, its mean weight in this image and the classes it owns."""
    rows = []
    for k in range(weights.shape[0]):
        classes = class_list(meta, expert_classes(meta, k))
        rows.append(
            f'<li><span class="swatch" style="background:{hex_colour(EXPERT_COLOURS[k])}"></span>'
            f"<b>{html.escape(expert_title(meta, k))}</b> ({float(weights[k].mean()):.0%} of the weight): "
            f"decides {html.escape(classes) or 'classes the metadata does not name'}</li>"
        )
    return f'<ul class="legend">{"".join(rows)}</ul>'


def legend_html(meta: Metadata) -> str:
    """Class swatches with names, frequency groups and, where it is not that group's namesake, the
    expert that owns the class; straight from the model's metadata."""
    groups, owners = group_of_classes(meta), expert_of_classes(meta)
    items = []
    for c, name in enumerate(meta.class_names):
        tags = [groups[c]] if c in groups else []
        if c in owners and expert_group(meta, owners[c]) != groups.get(c):
            tags.append(expert_title(meta, owners[c]))
        tag = f" <small>{html.escape(' · '.join(tags))}</small>" if tags else ""
        items.append(
            f'<li><span class="swatch" style="background:{hex_colour(meta.palette[c])}"></span>'
            f"{html.escape(name)}{tag}</li>"
        )
    return f'<ul class="legend columns">{"".join(items)}</ul>'


def share_table(share: np.ndarray, meta: Metadata) -> dict[str, list]:
    """Columns for the class-share bar chart: the classes present, as percent of the image."""
    present = [c for c in np.argsort(share)[::-1] if share[c] > 0]
    return {
        "class": [meta.class_names[c] for c in present],
        "share %": [round(100 * float(share[c]), 2) for c in present],
    }
