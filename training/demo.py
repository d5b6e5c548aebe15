"""`make demo` (until the served demo lands): a short synthetic training of MEDOE and the
baseline with the project's own training command, then their head/body/tail table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training import train
from training.evaluate import format_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", default="work/demo", help="where the runs go")
    parser.add_argument("--config", default="deeplabv3plus_tiny_synthetic_cpu", help="training config")
    parser.add_argument("--iters", type=int, default=300, help="stage-1 / baseline iterations")
    args = parser.parse_args(argv)
    results = {}
    for model in ("baseline", "medoe"):
        run = Path(args.work_dir) / model
        code = train.main(
            [
                "--config",
                args.config,
                "--model",
                model,
                "--work-dir",
                str(run),
                "--iters",
                str(args.iters),
                "--stage2-iters",
                str(args.iters),
                "--resume",
            ]
        )
        if code != 0:
            return code
        results[model] = json.loads((run / "metrics.json").read_text())
    print("\nHeld-out synthetic split, percent:\n")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
