"""Running code that comes with a model file: in a child process, with a wall-clock limit, a memory limit and
its output captured.

The child is started with multiprocessing's *spawn* (a fresh interpreter, never a fork of initaudit's memory).
Its first act is to point its file descriptors 1 and 2 at a capture file, so nothing it prints (a scripted
`print`, onnxruntime's C++ log lines, a library's warning) reaches the terminal; the capture is shown on stderr
only when asked (`--debug`). It answers with JSON through a pipe, never with a pickle.

Limits. Time: the parent kills the child when the model has run longer than the limit. Memory, on Linux: the
parent reads the child's resident size from /proc/PID/statm every 20 ms and kills it once it has grown past the
limit since the model started, and the child's data segment is capped too (RLIMIT_DATA, at the limit and some
slack: one huge allocation fails at once). RLIMIT_AS is not used: torch reserves far more address space than it
ever touches. Elsewhere the memory limit is best effort: RLIMIT_DATA where the system enforces it (macOS does not
for mapped memory; Windows has no such limit), so there only the time limit holds for sure. The child's files are
capped at MAX_OUTPUT_BYTES (RLIMIT_FSIZE) where the system has that limit. None of this is a file-system sandbox:
the model runs with the user's rights, which is why it runs only on an explicit `--trust-code`.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from initaudit.common.errors import InputError
from initaudit.common.printable import printable

STARTUP_SECONDS = 300       # the child's own start-up (a fresh interpreter importing torch), before the model runs
POLL_SECONDS = 0.02         # how often the parent looks at the child's time and memory
MAX_RESULT_BYTES = 64 << 20  # the largest answer read from the child
MAX_OUTPUT_BYTES = 1 << 20  # the child's captured output (and any file it writes) stops growing here
DATA_SLACK = 256 << 20      # RLIMIT_DATA sits this far above the memory limit: the watchdog speaks first
PR_SET_PDEATHSIG = 1         # prctl option: the signal a child gets when its parent dies (Linux)
READY = b"ready"            # the child's first message: set up, the model's code runs from now on
# What an allocation refused by RLIMIT_DATA looks like once torch or onnxruntime has turned it into an exception.
OUT_OF_MEMORY_MARKS = ("not enough memory", "can't allocate memory", "cannot allocate memory", "failed to allocate",
                       "bad_alloc", "bad allocation")


@dataclass(frozen=True)
class Policy:
    """What a model's run may do: whether code from a model file runs at all, for how long, in how much memory."""

    trust_code: bool = False          # run a TorchScript or ONNX file's graph (only on the command-line flag)
    time_limit: float | None = None   # seconds the model may run; None: a default scaled with the work
    memory_limit: int | None = None   # bytes the model's run may add to the child; None: scaled with the work
    build_memory: int | None = None   # bytes a model built from config.json may take; None: half the RAM
    show_output: bool = False         # copy the child's captured output to stderr (--debug)
    pickled: bool = False             # a live module was unpickled from its file: its forward runs in the child too


def run(job: str, args: tuple, seconds: float, memory: int, show_output: bool = False) -> Any:
    """`job(*args)` (job: 'package.module:function', returning JSON-able data) in a spawned child within `seconds`
    and `memory` bytes; its answer, or an InputError of one line when it overran, failed or died."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="initaudit-run-") as folder:
        output = Path(folder) / "output"
        output.touch()
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=child_main, args=(send, str(output), memory, job, args, os.getpid()),
                                daemon=True)
        try:
            child.start()
            send.close()
            return _await(child, receive, seconds, memory)
        finally:
            _stop(child)
            receive.close()
            if show_output:
                _echo(output)


def _await(child, receive, seconds: float, memory: int) -> Any:
    """The child's answer, watching its time and resident memory meanwhile."""
    deadline, baseline = time.monotonic() + STARTUP_SECONDS, None
    while True:
        if receive.poll(POLL_SECONDS):
            try:
                message = receive.recv_bytes(MAX_RESULT_BYTES)
            except (EOFError, OSError):
                raise _ended(child) from None
            if baseline is not None:
                return _answer(message, memory)
            baseline, deadline = resident(child.pid) or 0, time.monotonic() + seconds
            continue
        if time.monotonic() > deadline:
            if baseline is None:
                raise InputError(f"the child process that runs the model did not start within {STARTUP_SECONDS} s")
            raise InputError(_overran_time(seconds))
        size = resident(child.pid) if baseline is not None else None
        if size is not None and size - baseline > memory:
            raise InputError(_overran_memory(memory))


def resident(pid: int) -> int | None:
    """A process's resident memory in bytes (Linux's /proc; None elsewhere or once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _overran_time(seconds: float) -> str:
    return (f"the model ran longer than the {seconds:g} s time limit and was stopped (a hung or very slow graph; "
            "raise it with --time-limit)")


def _overran_memory(memory: int) -> str:
    return (f"the model's run took more than the {format_size(memory)} memory limit and was stopped (raise it with "
            "--memory-limit)")


def format_size(size: int) -> str:
    return f"{size / 2**30:.3g} GB" if size >= 2**30 else f"{size / 2**20:.3g} MB"


def _answer(message: bytes, memory: int) -> Any:
    """The child's last message: its result, or the error it reported."""
    try:
        answer = json.loads(message)
        kind, value = next(iter(answer.items()))
    except (ValueError, AttributeError, StopIteration):
        raise InputError("the child process that ran the model answered in an unexpected form") from None
    if kind == "result":
        return value
    if kind == "memory":
        raise InputError(_overran_memory(memory))
    if kind == "error":
        raise InputError(str(value))
    raise RuntimeError(f"in the child process that ran the model: {value}")


def _ended(child) -> InputError:
    child.join(5)
    code = child.exitcode
    if code is not None and code < 0:
        how = f"signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
    else:
        how = f"exit status {code}"
    return InputError(f"the child process that ran the model ended without an answer ({how}); run with --debug to "
                      "see its output")


def _stop(child) -> None:
    if child.pid is None:
        return
    if child.is_alive():
        child.kill()
    child.join()
    child.close()


def _echo(output: Path) -> None:
    """The child's captured output on stderr, control characters escaped (it comes from the model)."""
    with open(output, "rb") as f:
        text = f.read(MAX_OUTPUT_BYTES).decode("utf-8", "replace")
    if text:
        print("initaudit: debug: the model's child process printed:", file=sys.stderr)
        for line in text.splitlines():
            print(f"  {printable(line)}", file=sys.stderr)


# ---------------------------------------------------------------- in the child

def child_main(send, output: str, memory: int, job: str, args: tuple, parent: int | None = None) -> None:
    """The child's entry point: end with its parent, capture fds 1 and 2, import the job, cap memory and files,
    say ready, run it."""
    _end_with_parent(parent)
    _capture(output)
    module, _, name = job.partition(":")
    function = getattr(importlib.import_module(module), name)
    _limit(memory)
    send.send_bytes(READY)
    try:
        answer = {"result": function(*args)}
    except InputError as exc:
        answer = {"memory": True} if out_of_memory(exc) else {"error": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - what the model's code raises is reported, whatever it is
        answer = {"memory": True} if out_of_memory(exc) else {"internal": f"{type(exc).__name__}: {exc}"}
    send.send_bytes(json.dumps(answer).encode())
    sys.stdout.flush()
    sys.stderr.flush()


def _end_with_parent(parent: int | None) -> None:
    """Linux: the kernel kills this child when the process that started it dies (a CI job cancelled, `timeout`
    sending SIGTERM), so a model's run never outlives initaudit; a parent already gone ends it at once."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's own clean-up is what stops the child
        return
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _capture(output: str) -> None:
    fd = os.open(output, os.O_WRONLY | os.O_APPEND)
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)


def _limit(memory: int) -> None:
    """RLIMIT_DATA at the data segment's size now plus `memory` (and slack); RLIMIT_FSIZE at MAX_OUTPUT_BYTES."""
    try:
        import resource
    except ImportError:  # Windows: no such limits
        return
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the cap fails (EFBIG) instead of killing
    _lower(resource, resource.RLIMIT_FSIZE, MAX_OUTPUT_BYTES)
    data = _data_segment()
    if data is not None:
        _lower(resource, resource.RLIMIT_DATA, data + memory + DATA_SLACK)


def _lower(resource, which: int, value: int) -> None:
    """Lower a soft limit to `value` (never raise it); a system that refuses keeps its own (best effort)."""
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    if soft == resource.RLIM_INFINITY or value < soft:
        try:
            resource.setrlimit(which, (value, hard))
        except (ValueError, OSError):
            pass


def _data_segment() -> int | None:
    """This process's data segment (VmData) in bytes, where /proc says."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            line = next(line for line in f if line.startswith("VmData:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def out_of_memory(exc: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) says an allocation was refused."""
    while exc is not None:
        text = str(exc).lower()
        if isinstance(exc, MemoryError) or any(mark in text for mark in OUT_OF_MEMORY_MARKS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
