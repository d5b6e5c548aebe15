"""torchrun on CPU: two gloo processes train one model, and only rank 0 writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.data_fixtures import write_small_config
from training.common import SeededBatches

REPO = Path(__file__).resolve().parents[1]


def test_each_rank_gets_its_own_slice_of_the_global_batch():
    # World size 2 with 2 images per process sees exactly the batches of one process with 4.
    single = list(SeededBatches(100, 4, seed=7, iters=3))
    ranks = [list(SeededBatches(100, 2, seed=7, iters=3, rank=r, world_size=2)) for r in (0, 1)]
    for it in range(3):
        assert ranks[0][it] + ranks[1][it] == single[it]
        assert ranks[0][it] != ranks[1][it]
    # Resuming at iteration 2 gives the same slice as the uninterrupted run.
    assert list(SeededBatches(100, 2, seed=7, iters=3, start=2, rank=1, world_size=2)) == ranks[1][2:]


def test_torchrun_two_cpu_processes(tmp_path):
    config = write_small_config(tmp_path / "small.json")
    work = tmp_path / "run"
    # Drop any launcher variables of an enclosing job so this is a fresh two-process world.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    }
    env["PYTHONPATH"] = str(REPO)
    # Evaluation stays on: it runs on rank 0 alone after training and must not wait for rank 1.
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "training.train",
        "--config",
        str(config),
        "--work-dir",
        str(work),
        "--iters",
        "3",
        "--stage2-iters",
        "1",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"saved {work / 'final'}") == 1, result.stdout
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    # One line per iteration: rank 1 never opened the log.
    assert [(r["stage"], r["iter"]) for r in log] == [(1, 1), (1, 2), (1, 3), (2, 1)]
    for name in ("stage1", "final", "last"):
        assert (work / name / "model.safetensors").is_file()
    assert sorted(p.name for p in work.iterdir()) == [
        "class_stats.json",
        "final",
        "last",
        "log.jsonl",
        "metrics.json",
        "stage1",
    ]
    assert set(json.loads((work / "metrics.json").read_text())) >= {"mIoU", "oracle"}
