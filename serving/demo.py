"""Upload-and-view demo of the served MEDOE model, in the browser.

    python -m serving.demo --triton-url 127.0.0.1:8000                  # a Triton that is already up
    python -m serving.demo --start-triton model_repository              # also starts the embedded Triton

The page talks to Triton only through `serving.client`. Each upload is decoded once, here, by
the server's own rules (serving/decode.py); its pixels go to the `medoe` model, which returns
labels, confidence and expert weights only, and the page draws overlay and class shares itself.
An upload it cannot decode goes as it is to `segment`, so that a refusal is the
server's own message. Class names, colours, head/body/tail groups and what each expert owns
come from the model's metadata. The bundled examples are synthetic test-split scenes:
`python -m medoe.data.synthetic --out DIR --num 6 --split test`.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls

import argparse
import re
import signal
import sys
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np

from medoe.cli import CliParser
from medoe.contract import CLASS_SHARE, CONFIDENCE, EXPERT_WEIGHTS, LABELS, MODEL, SEGMENT
from serving import demo_views as views
from serving.client import ClientError, get_metadata, segment_images
from serving.decode import decode_image

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
EXAMPLES = sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix in (".png", ".jpg")) if EXAMPLES_DIR.is_dir() else []
MAX_UPLOAD = "10mb"  # Gradio refuses bigger uploads; the server has its own pixel limit behind that
CSS = """
.legend { list-style: none; padding: 0; margin: 0; }
.legend.columns { columns: 2; }
.legend li { margin: 2px 0; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: middle;
          border: 1px solid #0003; }
"""

# Where the callbacks send requests; main() sets them from the command line before launching.
settings = {"url": os.environ.get("MEDOE_TRITON_URL", "127.0.0.1:8000"), "protocol": "http"}


def _message(err: ClientError) -> str:
    text = str(err)
    if text.startswith("cannot reach"):
        return f"**Triton is unreachable** at `{settings['url']}`: {text}"
    return f"**Refused by the server:** {text.removeprefix('server: ')}"


def _cleared(status: str) -> tuple:
    """Every view emptied, so no earlier image's answer stays next to a new message."""
    return None, None, None, None, None, None, "", status, gr.skip()


def segment(path: str | None, alpha: float, shown: list[str] | None):
    """Decodes the upload once, segments its pixels on Triton's `medoe`; returns every view of the answer."""
    if not path:
        return _cleared("Upload an image or pick an example.")
    name, data = Path(path).name, Path(path).read_bytes()
    start = time.perf_counter()
    try:
        image = decode_image(data)  # the pixels the overlay is drawn on, and what the model gets
    except ValueError as err:
        return _cleared(_refusal(name, data, err))
    try:  # the overlay is redrawn here at every opacity, so the model's outputs are all it needs
        results, meta = segment_images(
            [(name, image)],
            settings["url"],
            settings["protocol"],
            model=MODEL,
            outputs=(LABELS, CLASS_SHARE, CONFIDENCE, EXPERT_WEIGHTS),
            retries=1,
            backoff=0.2,
            timeout=30,
        )
    except ClientError as err:
        return _cleared(_message(err))
    seconds = time.perf_counter() - start
    result = results[0]
    state = {"image": image, "labels": result.labels, "meta": meta}
    shown = shown or list(meta.class_names)  # the class list is empty until metadata arrived once
    height, width = result.labels.shape
    status = (
        f"Segmented **{name}** ({width}x{height}) in **{seconds * 1000:.0f} ms** "
        f"(decoded here, Triton `{MODEL}` over {settings['protocol'].upper()} at `{settings['url']}`; "
        f"mean confidence {float(result.confidence.mean()):.0%})."
    )
    return (
        state,
        *render(state, alpha, shown),
        share_plot(result.class_share, meta),
        views.confidence_image(result.confidence),
        views.expert_image(result.expert_weights, (height, width)),
        views.expert_summary_html(result.expert_weights, meta),
        status,
        gr.CheckboxGroup(choices=list(meta.class_names), value=shown),
    )


def _refusal(name: str, data: bytes, err: ValueError) -> str:
    """An upload this page cannot decode goes to `segment` as it is: the server
    judges it, and its refusal (HTTP 400 / INVALID_ARGUMENT) is what every client would see."""
    try:
        segment_images(
            [(name, data)],
            settings["url"],
            settings["protocol"],
            model=SEGMENT,
            outputs=(CLASS_SHARE,),
            retries=1,
            backoff=0.2,
            timeout=30,
        )
    except ClientError as refused:
        return _message(refused)
    return f"**Not shown:** the server accepts **{name}**, but this page cannot decode it: {err}"


def render(state: dict | None, alpha: float, shown: list[str] | None):
    """Overlay and annotated image for the current opacity and class toggles (no new request)."""
    if not state:
        return None, None
    meta = state["meta"]
    annotated = gr.AnnotatedImage(
        (state["image"], views.annotations(state["labels"], meta, shown)), color_map=views.class_colour_map(meta)
    )
    return views.shown_overlay(state["image"], state["labels"], meta, alpha, shown), annotated


def share_plot(share: np.ndarray, meta) -> gr.BarPlot:
    import pandas as pd

    table = pd.DataFrame(views.share_table(share, meta))
    colours = {name: colour for name, colour in views.class_colour_map(meta).items() if name in set(table["class"])}
    return gr.BarPlot(table, x="class", y="share %", color="class", color_map=colours, sort="-y", x_label_angle=-40)


def load_metadata():
    """On page load: legend and class toggles from the model's metadata, or why they are missing."""
    try:
        meta = get_metadata(settings["url"], settings["protocol"], retries=1, backoff=0.2)
    except ClientError as err:
        return "", gr.CheckboxGroup(choices=[], value=[]), _message(err)
    names = list(meta.class_names)
    return (
        views.legend_html(meta),
        gr.CheckboxGroup(choices=names, value=names),
        f"Connected to Triton at `{settings['url']}` ({settings['protocol'].upper()}): "
        f"{len(names)} classes, {views.experts_line(meta)}. Upload an image or pick an example.",
    )


with gr.Blocks(title="MEDOE segmentation on Triton") as demo:
    gr.Markdown(
        "# MEDOE: long-tailed segmentation served by Triton\nUpload a street scene (JPEG, PNG, BMP "
        f"or WebP, at most {MAX_UPLOAD.upper()}) or pick an example; the model answers from Triton."
    )
    status = gr.Markdown(elem_id="status")
    state = gr.State()
    with gr.Row():
        with gr.Column():
            # image_mode=None: the file arrives as uploaded (Gradio would re-encode other modes as RGB), to be
            # decoded by the server's rules.
            image_in = gr.Image(
                type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image", elem_id="input-image"
            )
            gr.Examples([[str(p)] for p in EXAMPLES], inputs=[image_in], label="Synthetic street scenes (test split)")
            alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity", elem_id="opacity")
        overlay_out = gr.Image(label="Overlay", format="png", interactive=False, elem_id="overlay")
    with gr.Row():
        annotated_out = gr.AnnotatedImage(
            label="Segments (hover a class in the legend)", format="png", elem_id="annotated"
        )
        with gr.Column():
            classes = gr.CheckboxGroup(label="Classes shown", elem_id="classes")
            legend = gr.HTML(elem_id="legend")
    with gr.Row():
        share_out = gr.BarPlot(label="Pixel share per class (%)", x="class", y="share %", elem_id="share")
        confidence_out = gr.Image(
            label="Confidence (max class probability; dark = unsure)",
            format="png",
            interactive=False,
            elem_id="confidence",
        )
        with gr.Column():
            experts_out = gr.Image(
                label="Which expert decides where (MOE weights)", format="png", interactive=False, elem_id="experts"
            )
            experts_legend = gr.HTML(elem_id="experts-legend")

    outputs = [
        state,
        overlay_out,
        annotated_out,
        share_out,
        confidence_out,
        experts_out,
        experts_legend,
        status,
        classes,
    ]
    image_in.change(segment, [image_in, alpha, classes], outputs, api_name="segment")
    alpha.release(render, [state, alpha, classes], [overlay_out, annotated_out], api_name=False)
    classes.input(render, [state, alpha, classes], [overlay_out, annotated_out], api_name=False)
    demo.load(load_metadata, None, [legend, classes, status], api_name=False)


def upload_size(text: str) -> str:
    """`--max-upload` in Gradio's own form, checked here so a typo gets a clear one-line error."""
    if not re.fullmatch(r"\d+\s*(b|kb|mb|gb)", text.strip().lower()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 10mb, 500kb or 1gb")
    return text.strip().lower()


def get_args(argv=None) -> argparse.Namespace:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--triton-url",
        default=settings["url"],
        help="HOST:PORT of Triton's HTTP (or, with --protocol grpc, gRPC) endpoint",
    )
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http", help="how to talk to Triton")
    parser.add_argument(
        "--start-triton",
        metavar="REPOSITORY",
        help="start the embedded Triton on this model repository (free local ports) and stop it on exit",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address the page binds (0.0.0.0 exposes it to the network)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port of the page")
    parser.add_argument("--max-upload", type=upload_size, default=MAX_UPLOAD, help="largest accepted upload, e.g. 10mb")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    from serving.processes import free_ports
    from serving.repository import ServerError
    from serving.supervisor import start_server

    server = None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        if args.start_triton:
            print(f"starting Triton on {args.start_triton} ...", flush=True)
            server = start_server(args.start_triton, *free_ports(3))
            args.triton_url = server.grpc_url if args.protocol == "grpc" else server.http_url
        settings.update(url=args.triton_url, protocol=args.protocol)
        try:
            demo.queue(default_concurrency_limit=4).launch(
                server_name=args.host,
                server_port=args.port,
                share=False,
                max_file_size=args.max_upload,
                prevent_thread_lock=True,
                quiet=True,
                css=CSS,
                allowed_paths=[str(EXAMPLES_DIR)],
            )
        except OSError as err:
            raise ServerError(f"cannot serve the page on {args.host}:{args.port}: {err} (pass --port)") from None
        print(
            f"demo: http://{args.host}:{args.port}  (Triton {args.protocol.upper()} at {args.triton_url}); "
            "Ctrl-C stops " + ("both" if server else "the page"),
            flush=True,
        )
        while not stop.wait(0.5):
            if server and server.process.poll() is not None:
                print(f"error: Triton exited with {server.process.returncode}: {server.log_tail(1)}", file=sys.stderr)
                return 1
        return 0
    except (ServerError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        demo.close()
        if server:
            server.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    sys.exit(main())
