"""Processes on Linux: free ports, the /proc process tree, and children that die with their parent.

Used by serving/server.py to start and watch tritonserver, its python-backend stubs and the
proxy, and by the benchmarks, soak and tests to find and measure them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int):
    """preexec_fn: the kernel SIGKILLs the child when the thread that started it ends, so a
    SIGKILLed serving.server or demo leaves no tritonserver or proxy behind (the stubs, which
    tritonserver forks, exit at their next check that their parent lives)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return arm


def exit_reason(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"exited with {code}"


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (all held at once while chosen, so never the same twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process, from /proc; processes that exit meanwhile are skipped."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def stub_instance(args: list[str]) -> str | None:
    """The model instance (e.g. `medoe_0_0`) a python-backend stub serves, from its argv; None
    for any other process."""
    return args[8] if len(args) > 8 and args[0].endswith("triton_python_backend_stub") else None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (tritonserver, its python-backend stubs), breadth first."""
    parents = parent_pids()
    tree = [pid]
    for parent in tree:  # grows while it is walked
        tree += [p for p, pp in parents.items() if pp == parent]
    return tree[1:]


def child_processes(parent: int) -> dict[int, list[str]]:
    """argv of every direct child of `parent`, from /proc (the stubs may be forked by any of its threads)."""
    return {pid: cmdline(pid) for pid, pp in parent_pids().items() if pp == parent}


def alive_child(pid: int, parent: int) -> bool:
    # A killed stub stays a zombie: tritonserver never reaps it. The parent check guards against pid reuse.
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return False
    return state != "Z" and int(ppid) == parent
