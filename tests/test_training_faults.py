"""Killing training during a checkpoint save: the previous checkpoint is still intact and --resume works.

No hook in the code under test:
- the real `python -m training.train` is SIGKILLed while it is writing `DIR/last`. A watcher
  polls the work directory; when a save's staging directory (`.last.tmp-*`) shows up it
  SIGSTOPs the trainer, checks that the save really is still in flight and has written
  something, and only then sends SIGKILL, so the kill lands inside the save by construction,
  not by timing luck;
- `save_checkpoint` is killed at every statement it executes (a forked child, sys.settrace,
  SIGKILL), which reaches moments no polling could, such as between two renames;
- the two-rename fallback (filesystems without RENAME_EXCHANGE) is interrupted between its
  renames (monkeypatched, like tests/test_checkpoint.py's failed-save test).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_training import config_path, read_log  # noqa: F401  (config_path is a fixture)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def staging(work: Path) -> list[str]:
    """Temporary siblings of DIR/last: a save of `last` is in flight while one exists."""
    return sorted(p for p in os.listdir(work) if p.startswith(".last.")) if work.is_dir() else []


def read_tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def freeze(process: subprocess.Popen) -> None:
    """SIGSTOP, then wait until the kernel reports the process stopped (the signal is asynchronous)."""
    process.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{process.pid}/stat")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return  # no procfs, or gone
        if state in ("T", "t", "Z", "X"):
            return
        time.sleep(0.0001)


def kill_during_a_save(
    process: subprocess.Popen, work: Path, timeout: float = 60.0
) -> tuple[dict[str, bytes], list[str]]:
    """SIGKILLs `process` while it saves DIR/last (never the first save), once the save has
    written something; returns the `last` seen before that save began and the staging entries
    present at the kill."""
    snapshot = None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            in_flight = staging(work)
            if snapshot is None and not in_flight and (work / "last").is_dir():
                freeze(process)  # `last` cannot change while it is read
                if not staging(work) and (work / "last").is_dir():
                    snapshot = read_tree(work / "last")
                process.send_signal(signal.SIGCONT)
            elif snapshot is not None and in_flight:
                freeze(process)
                in_flight = staging(work)
                assert (work / "last").is_dir(), f"{work / 'last'} is missing while a save is in flight: {in_flight}"
                written = [name for entry in in_flight for name in os.listdir(work / entry)]
                if in_flight and not written:
                    pass  # too early, nothing written yet: let it write a little
                elif in_flight and read_tree(work / "last") == snapshot:
                    process.send_signal(signal.SIGKILL)  # the save is in flight and `last` untouched so far
                    process.wait(10)
                    return snapshot, in_flight
                else:  # stopped after the swap: that save is complete; it becomes the previous one
                    snapshot = None
                process.send_signal(signal.SIGCONT)
            time.sleep(0.0002)
        raise AssertionError(
            f"never caught a save of {work / 'last'} in flight with the previous checkpoint intact "
            f"(exit {process.poll()}, entries {sorted(os.listdir(work))})"
        )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_sigkill_during_a_checkpoint_save_then_resume(tmp_path, config_path):  # noqa: F811
    from medoe.checkpoint import load_checkpoint

    work = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "training.train",
        "--config",
        config_path,
        "--work-dir",
        str(work),
        "--iters",
        "12",
        "--stage2-iters",
        "1",
        "--save-every",
        "1",
        "--no-eval",
    ]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    snapshot, in_flight = kill_during_a_save(process, work)
    assert process.returncode == -signal.SIGKILL
    assert not (work / "final").exists()

    # The previous checkpoint is there, byte for byte, and loads with its training state; the
    # half-written save is only a hidden staging directory beside it.
    assert read_tree(work / "last") == snapshot
    previous = load_checkpoint(work / "last", train_state=True).train_state
    assert previous["stage"] == 1, previous  # stage 1 has 12 saves to catch; stage 2 has only the last one
    assert staging(work) == in_flight and all(name.startswith(".last.tmp-") for name in in_flight)
    assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == [
        "class_stats.json",
        "last",
        "log.jsonl",
    ]

    result = subprocess.run([*command, "--resume"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    # --resume took `last` (the previous checkpoint), not the staging directory.
    assert f"resuming stage {previous['stage']} at iteration {previous['iter']} from {work / 'last'}" in result.stdout
    final = load_checkpoint(work / "final")
    assert final.config.model == "medoe"
    assert load_checkpoint(work / "last", train_state=True).train_state["stage"] == 2
    assert not staging(work)  # the next save cleared the killed save's staging directory

    # Every iteration is logged; the one whose save was killed ran twice, with the same loss.
    log = read_log(work)
    keys = [(r["stage"], r["iter"]) for r in log]
    assert sorted(set(keys)) == [(1, i) for i in range(1, 13)] + [(2, 1)]
    killed = (1, previous["iter"] + 1) if previous["iter"] < 12 else (2, 1)
    assert [k for k in set(keys) if keys.count(k) > 1] == [killed]
    losses = [r["loss"] for r in log if (r["stage"], r["iter"]) == killed]
    np.testing.assert_allclose(losses[0], losses[1], rtol=0, atol=1e-6)


def _crash_points(root: str) -> None:
    """Run in a fresh interpreter: kill save_checkpoint at its n-th statement, n = 1, 2, ...,
    until a save completes; print one JSON line per n about what DIR then holds."""
    import shutil

    import torch

    import medoe.checkpoint as checkpoint
    from tests.test_checkpoint import make

    torch.set_num_threads(1)
    root = Path(root)
    old, stats = make()
    new, _ = make()
    with torch.no_grad():
        for parameter in new.parameters():
            parameter.add_(1.0)
    checkpoint.save_checkpoint(root / "backup" / "ckpt", old, stats, {"iter": 1})
    directory = root / "work" / "ckpt"
    reference = {"old": old.state_dict(), "new": new.state_dict()}
    for n in range(1, 1000):
        shutil.rmtree(root / "work", ignore_errors=True)
        shutil.copytree(root / "backup", root / "work")
        pid = os.fork()
        if pid == 0:  # the child: count the statements run in medoe/checkpoint.py, die at the n-th
            count = 0

            def tracer(frame, event, arg, stop_at=n):
                nonlocal count
                if frame.f_code.co_filename != checkpoint.__file__ or frame.f_code.co_name.startswith("<"):
                    return None
                if event == "line":
                    count += 1
                    if count == stop_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                return tracer

            sys.settrace(tracer)
            checkpoint.save_checkpoint(directory, new, stats, {"iter": 2})
            sys.settrace(None)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        record = {
            "n": n,
            "killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
            "entries": sorted(p.name for p in directory.parent.iterdir()),
        }
        try:
            loaded = checkpoint.load_checkpoint(directory, train_state=True)
            state = loaded.model.state_dict()
            record["iter"] = loaded.train_state["iter"]
            record["weights"] = next(
                (name for name, ref in reference.items() if all(torch.equal(state[k], ref[k]) for k in ref)), "mixed"
            )
            checkpoint.save_checkpoint(directory, old, stats, {"iter": 3})  # the next save works over the leftovers
            record["next_save"] = checkpoint.load_checkpoint(directory, train_state=True).train_state["iter"]
        except checkpoint.CheckpointError as err:
            record["error"] = str(err)
        print(json.dumps(record), flush=True)
        if not record["killed"]:
            return


def test_a_kill_at_any_statement_of_a_save_leaves_the_old_or_the_new_checkpoint(tmp_path):
    code = f"from tests.test_training_faults import _crash_points; _crash_points({str(tmp_path)!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    killed, completed = records[:-1], records[-1]
    assert len(killed) >= 10 and all(r["killed"] for r in killed) and not completed["killed"]
    for record in records:
        assert "error" not in record, record
        assert (record["iter"], record["weights"]) in {(1, "old"), (2, "new")}, record
        assert record["next_save"] == 3, record
    # Old up to one statement, new from there on: the switch is a single step.
    versions = [r["iter"] for r in records]
    assert versions == sorted(versions) and versions[0] == 1 and versions[-1] == 2
    # The kills did land mid-save: some left a half-written staging directory behind.
    assert any(any(e.startswith(".ckpt.tmp-") for e in r["entries"]) and r["iter"] == 1 for r in killed)


def test_without_an_atomic_exchange_a_failed_swap_puts_the_previous_checkpoint_back(tmp_path, monkeypatch):
    # Filesystems without RENAME_EXCHANGE (NFS, ...) get two renames; an interruption between
    # them (Ctrl-C) must not leave DIR without its checkpoint.
    import medoe.checkpoint as checkpoint
    from tests.test_checkpoint import make

    model, stats = make()
    checkpoint.save_checkpoint(tmp_path / "ckpt", model, stats, {"iter": 1})
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    replace = os.replace

    def interrupted(src, dst):
        if Path(src).name.startswith(".ckpt.tmp-"):  # the new checkpoint moving in, the old one already out
            assert not (tmp_path / "ckpt").exists()
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path / "ckpt", model, stats, {"iter": 2})
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(tmp_path / "ckpt", train_state=True).train_state == {"iter": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
