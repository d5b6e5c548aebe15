"""What the demo draws from a served answer, as plain numpy and HTML (testable without Gradio).

Every name, colour and group comes from the model's metadata (`serving.client.Metadata`);
nothing here knows the classes of a particular model.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import cv2
import numpy as np

from serving.client import Metadata
from serving.processing import overlay, resize_map

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies, and none
# of them is a Cityscapes class colour, so the expert map is never read as a class map.
GROUP_COLOURS = ((0, 114, 178), (0, 158, 115), (213, 94, 0), (204, 121, 167), (230, 159, 0))


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(v) for v in rgb[:3]))


def group_of_classes(meta: Metadata) -> dict[int, str]:
    return {c: name for name, classes in meta.groups.items() for c in classes}


def expert_names(meta: Metadata, num_experts: int) -> list[str]:
    """Expert k is trained on groups k..K, so it is named after group k (head, body, tail)."""
    names = list(meta.groups)
    return [names[k] if k < len(names) else f"expert {k + 1}" for k in range(num_experts)]


def class_colour_map(meta: Metadata) -> dict[str, str]:
    return {name: hex_colour(meta.palette[c]) for c, name in enumerate(meta.class_names)}


def shown_overlay(image: np.ndarray, labels: np.ndarray, meta: Metadata, alpha: float,
                  shown: Sequence[str] | None) -> np.ndarray:
    """The colour overlay; pixels of classes not in `shown` keep the plain image."""
    blended = overlay(image, labels, meta.palette, alpha)
    hidden = [c for c, name in enumerate(meta.class_names) if shown is not None and name not in shown]
    if hidden:
        mask = np.isin(labels, hidden)
        blended[mask] = image[mask]
    return blended


def annotations(labels: np.ndarray, meta: Metadata, shown: Sequence[str] | None) -> list[tuple[np.ndarray, str]]:
    """(mask, class name) pairs for gr.AnnotatedImage: the classes present and shown, largest first."""
    counts = np.bincount(labels.ravel(), minlength=len(meta.class_names))[:len(meta.class_names)]
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
    if weights.ndim != 3 or weights.shape[0] > len(GROUP_COLOURS):
        raise ValueError(f"expert_weights must be [K, h, w] with K <= {len(GROUP_COLOURS)}, got {weights.shape}")
    colours = np.asarray(GROUP_COLOURS[:weights.shape[0]], np.float32)
    resized = np.stack([resize_map(w, size) for w in weights], axis=-1)  # [H, W, K]
    return np.clip(np.rint(resized @ colours), 0, 255).astype(np.uint8)


def expert_summary_html(weights: np.ndarray, meta: Metadata) -> str:
    """One line per expert: its colour, its group's classes and its mean weight in this image."""
    names = expert_names(meta, weights.shape[0])
    rows = []
    for k, name in enumerate(names):
        classes = ", ".join(meta.class_names[c] for c in meta.groups.get(name, []))
        rows.append(f'<li><span class="swatch" style="background:{hex_colour(GROUP_COLOURS[k])}"></span>'
                    f"<b>{html.escape(name)} expert</b> ({float(weights[k].mean()):.0%} of the weight): "
                    f"decides {html.escape(classes) or 'its group'}</li>")
    return f'<ul class="legend">{"".join(rows)}</ul>'


def legend_html(meta: Metadata) -> str:
    """Class swatches with names and frequency groups, straight from the model's metadata."""
    groups = group_of_classes(meta)
    items = []
    for c, name in enumerate(meta.class_names):
        tag = f' <small>{html.escape(groups[c])}</small>' if c in groups else ""
        items.append(f'<li><span class="swatch" style="background:{hex_colour(meta.palette[c])}"></span>'
                     f"{html.escape(name)}{tag}</li>")
    return f'<ul class="legend columns">{"".join(items)}</ul>'


def share_table(share: np.ndarray, meta: Metadata) -> dict[str, list]:
    """Columns for the class-share bar chart: the classes present, as percent of the image."""
    present = [c for c in np.argsort(share)[::-1] if share[c] > 0]
    return {"class": [meta.class_names[c] for c in present], "share %": [round(100 * float(share[c]), 2) for c in present]}
