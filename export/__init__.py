"""Deployment: the fused ONNX graph, TensorRT engines, Triton configs and inference benchmarks."""

import argparse
import sys


class CliParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one `error: ...` line (exit 2), like every other error here."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)
