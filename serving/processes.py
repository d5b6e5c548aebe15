"""Processes on Linux: free ports, the process tree (psutil), and children that die with their parent.

Used by serving/supervisor.py to start and watch tritonserver, its python-backend stubs and the
proxy, and by the benchmarks, soak and tests to find and measure them. Processes may exit while
they are looked at: every helper here treats a vanished one as gone instead of raising.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket

import psutil

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>; psutil has no wrapper for it


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


def cmdline(pid: int) -> list[str]:
    """argv of `pid`; [""] once it has exited (a zombie has no argv either), so argv[0] can always be tested."""
    try:
        return psutil.Process(pid).cmdline() or [""]
    except psutil.Error:  # NoSuchProcess (ZombieProcess included), AccessDenied
        return [""]


def stub_instance(args: list[str]) -> str | None:
    """The model instance (e.g. `medoe_0_0`) a python-backend stub serves, from its argv; None
    for any other process."""
    return args[8] if len(args) > 8 and args[0].endswith("triton_python_backend_stub") else None


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (tritonserver, its python-backend stubs, zombies included), in pid
    order (the order they started unless pids wrapped); [] once `pid` has exited."""
    try:
        return sorted(child.pid for child in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def child_processes(parent: int) -> dict[int, list[str]]:
    """argv of every direct child of `parent` (the stubs may be forked by any of its threads:
    psutil reads each process's parent, not the thread that forked it)."""
    try:
        children = psutil.Process(parent).children()
    except psutil.Error:
        return {}
    return {child.pid: cmdline(child.pid) for child in children}


def alive_child(pid: int, parent: int) -> bool:
    # A killed stub stays a zombie: tritonserver never reaps it. The parent check guards against pid reuse.
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            return process.status() != psutil.STATUS_ZOMBIE and process.ppid() == parent
    except psutil.Error:
        return False
