"""Run a validation candidate in a child process, one case at a time.

:func:`refimpl.validate.validate` uses this for candidates named by a TARGET
string (always, from the command line).  The candidate is foreign code: it
may call ``sys.exit`` or ``os._exit``, crash the interpreter (segfault,
``abort()``), hang, read stdin or print megabytes.  None of that may end,
block or flood the validation, and none of it may look like a pass.

Design
------
One child interpreter (``python -m refimpl._isolation``) per run, not per
case, so a framework is imported once (``import torch``/``jax`` costs
seconds).  The parent keeps the trusted part: it computes or loads the
reference numbers and sends the child a job file (the cases with their
reference numbers, the TARGETs, the framework).  The child imports the
TARGETs, then for each case writes a ``start`` message, runs the same
:func:`refimpl.validate._run_case` as the in-process mode and writes a
``done`` message with the case's report (JSON lines on a pipe of its own).

The parent watches that pipe with a deadline per case (``timeout``):

* ``done`` in time: the case's report;
* the pipe ends before ``done`` (``os._exit``, a signal, a fatal error):
  that case is an ``ERROR`` naming the exit status or signal, and a fresh
  child continues with the cases after it, so one crash costs one case;
* the deadline passes: the child's process group is killed, the case is an
  ``ERROR`` ("did not finish within ... s"), a fresh child continues;
* Ctrl-C in the parent: the child is killed, every case not finished is
  an ``ERROR`` ("interrupted"), and :func:`run` reports ``interrupted``.

The child's stdout and stderr (file descriptors 1 and 2, so C extensions'
output too) go to one pipe the parent drains; each case keeps only the
last :data:`TAIL_BYTES` and the byte count, and a case writing more than
:data:`OUTPUT_LIMIT` bytes is stopped and reported as an ``ERROR``.  The
child runs in a session of its own (a terminal's Ctrl-C reaches only the
parent), has ``/dev/null`` as stdin, and ends itself when the parent goes
away (a thread waits for the end of a pipe only the parent holds).
``faulthandler`` is enabled in the child, so a segfault leaves the Python
stack in the captured output.

``sys.exit()`` inside the candidate does not end the child at all: it is an
exception like any other for :func:`refimpl.validate._run_case`.
"""

from __future__ import annotations

import json
import os
import pickle
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

#: Default deadline of one case (and of importing the TARGETs), seconds.
DEFAULT_TIMEOUT = 300.0
#: A case whose candidate writes more than this many bytes to stdout/stderr is stopped.
OUTPUT_LIMIT = 1 << 20
#: Bytes of a case's stdout/stderr kept for the report (the last ones).
TAIL_BYTES = 2048
#: Seconds a child that reported its last case gets to exit before it is killed.
_EXIT_GRACE = 5.0
#: Seconds a child may take to start and import refimpl (not the candidate's
#: time: the per-case ``timeout`` starts when the child begins importing the TARGET).
_STARTUP = 120.0

_SIGNAL_HINTS = {
    "SIGSEGV": "segmentation fault",
    "SIGBUS": "bus error",
    "SIGABRT": "abort(), e.g. a failed assertion in C code",
    "SIGFPE": "floating-point exception",
    "SIGILL": "illegal instruction",
    "SIGKILL": "killed, e.g. by the out-of-memory killer",
}


@dataclass(frozen=True)
class Job:
    """One case to run: its index in the report, reference numbers and tolerances."""

    index: int
    case: Any          # refimpl.vectors.GoldenCase
    ftol: float
    gtol: float


@dataclass
class Outcome:
    """What became of one job: the child's report dict, or ``error`` (why not)."""

    report: dict | None = None
    error: str = ""
    output_bytes: int = 0
    output_tail: str = ""
    arrays: dict | None = None


@dataclass
class RunResult:
    """The outcomes in job order, the framework's version, and whether Ctrl-C ended it."""

    outcomes: list[Outcome]
    framework_version: str = "?"
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)


class LoadError(Exception):
    """The child could not import the TARGETs (message for :class:`TargetError`)."""


def exit_reason(returncode: int | None) -> str:
    """A process's end in words: exit status or signal name (with what it usually means)."""
    if returncode is None:
        return "the process did not end"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = _SIGNAL_HINTS.get(name)
        return f"killed by {name}" + (f" ({hint})" if hint else "")
    return (f"exited with status {returncode} (os._exit(), a C-level exit() or a fatal "
            "error inside the candidate)")


class _Tail:
    """The byte count and the last ``TAIL_BYTES`` bytes of a stream."""

    def __init__(self):
        self.total = 0
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        self.buf += data[-TAIL_BYTES:]
        del self.buf[:-TAIL_BYTES]

    def text(self) -> str:
        return bytes(self.buf).decode("utf-8", errors="replace")


class _Child:
    """One child process: its message pipe, its output pipe, and the current case's output."""

    def __init__(self, job_file: Path):
        msg_r, msg_w = os.pipe()
        out_r, out_w = os.pipe()
        ack_r, ack_w = os.pipe()
        env = dict(os.environ)
        # the child imports this very refimpl, whatever its own sys.path says
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            [pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PYTHONUNBUFFERED"] = "1"       # the candidate's prints reach the pipe in order
        env["PYTHONFAULTHANDLER"] = "1"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "refimpl._isolation", str(msg_w), str(ack_r),
                 str(job_file)],
                stdin=subprocess.PIPE, stdout=out_w, stderr=out_w, pass_fds=(msg_w, ack_r),
                start_new_session=True, env=env)
        finally:
            os.close(msg_w)
            os.close(out_w)
            os.close(ack_r)
        self.msg_r, self.out_r, self.ack_w = msg_r, out_r, ack_w
        os.set_blocking(msg_r, False)
        os.set_blocking(out_r, False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(msg_r, selectors.EVENT_READ)
        self.sel.register(out_r, selectors.EVENT_READ)
        self.lines: deque[bytes] = deque()
        self.partial = b""
        self.msg_eof = self.out_eof = False
        self.output = _Tail()

    def _drain_output(self) -> None:
        while not self.out_eof:
            try:
                data = os.read(self.out_r, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                self.out_eof = True
                self.sel.unregister(self.out_r)
                return
            self.output.feed(data)
            if self.output.total > OUTPUT_LIMIT:
                return

    def _read_messages(self) -> None:
        while not self.msg_eof:
            try:
                data = os.read(self.msg_r, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                self.msg_eof = True
                self.sel.unregister(self.msg_r)
                return
            *done, self.partial = (self.partial + data).split(b"\n")
            self.lines.extend(done)

    def event(self, deadline: float):
        """The next message (a dict), or "eof", "timeout" or "flood"."""
        while True:
            while self.lines:
                try:
                    msg = json.loads(self.lines.popleft())
                except ValueError:
                    continue            # not ours: ignore whatever else reached the pipe
                if isinstance(msg, dict) and "event" in msg:
                    return msg
            if self.output.total > OUTPUT_LIMIT:
                return "flood"
            if self.msg_eof:
                return "eof"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            self.sel.select(min(remaining, 1.0))
            # output first: what the child wrote before a message is attributed
            # to the case that message closes
            self._drain_output()
            self._read_messages()

    def begin_case(self) -> None:
        """Start a fresh output capture, then let the child run the case it announced.

        The child waits for this byte after its ``start`` message, so all it
        writes while running the case lands in the fresh capture.
        """
        self._drain_output()
        self.output = _Tail()
        try:
            os.write(self.ack_w, b"g")
        except OSError:         # the child is gone; its end is noticed by event()
            pass

    def end_case(self) -> None:
        """Collect what the child wrote before its ``done`` message."""
        self._drain_output()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # the child and anything it started
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()        # in case the child left its process group
        except ProcessLookupError:
            pass
        self.proc.wait()

    def finish(self) -> int | None:
        """Wait (briefly) for the child to end; kill it if it does not.  Its exit status."""
        try:
            self.proc.wait(timeout=_EXIT_GRACE)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.returncode is None:
            self.kill()
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.sel.close()
        for fd in (self.msg_r, self.out_r, self.ack_w):
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass
class _RunState:
    """What :func:`run` has gathered so far, and the child and case in flight:
    everything its Ctrl-C handler needs, wherever the interrupt lands."""

    outcomes: dict[int, Outcome]
    result: RunResult
    child: _Child | None = None
    current: Job | None = None


def _is_event(ev, name: str) -> bool:
    """``ev`` is a message (not "timeout", "flood" or the pipe's end) called ``name``."""
    return isinstance(ev, dict) and ev["event"] == name


def _write_job_file(tmp: str, pending: list[Job], *, op: str, candidate: str,
                    vjp: str | None, framework: str, keep_arrays: bool, against: str,
                    unbatched: bool) -> Path:
    """The job file a child reads: ``pending`` and the run's settings, pickled into ``tmp``."""
    job_file = Path(tmp) / "job.pickle"
    job_file.write_bytes(pickle.dumps({
        "op": op, "candidate": candidate, "vjp": vjp, "framework": framework,
        "jobs": pending, "sys_path": list(sys.path), "tmp": tmp,
        "keep_arrays": keep_arrays, "against": against,
        "unbatched": unbatched}, protocol=pickle.HIGHEST_PROTOCOL))
    return job_file


def _await_load(child: _Child, timeout: float) -> tuple[Any, bool]:
    """The child's answer to importing the TARGETs, and whether it started at all."""
    loaded = child.event(time.monotonic() + _STARTUP)
    started = _is_event(loaded, "ready")
    if started:
        loaded = child.event(time.monotonic() + timeout)
    return loaded, started


def _load_failure(child: _Child, loaded, *, started: bool, timeout: float) -> str:
    """Why the child did not load the TARGETs (``loaded``: its last event), killing
    it where it still runs."""
    if _is_event(loaded, "target_error"):
        return str(loaded.get("message", "cannot import the TARGET"))
    if loaded == "timeout":
        child.kill()
        return (f"importing the TARGET did not finish within {timeout:g} s" if started else
                f"the validation process did not start within {_STARTUP:g} s")
    if loaded == "flood":
        child.kill()
        return f"importing the TARGET wrote more than {OUTPUT_LIMIT} bytes to stdout/stderr"
    return f"the process importing the TARGET {exit_reason(child.finish())}"


def _stream_failure(child: _Child, ev, *, between_cases: bool, timeout: float) -> str:
    """Why the child stopped answering (``ev``: "timeout", "flood" or the pipe's end),
    killing it where it still runs."""
    if ev == "timeout" and between_cases:
        child.kill()
        return f"the validation process stalled for {timeout:g} s between cases"
    if ev == "timeout":
        child.kill()
        return f"did not finish within {timeout:g} s (--timeout); the candidate was stopped"
    if ev == "flood":
        child.kill()
        return (f"the candidate wrote more than {OUTPUT_LIMIT} bytes to "
                "stdout/stderr; it was stopped (the last bytes are shown)")
    return f"the validation process {exit_reason(child.finish())}"


def _record_failure(state: _RunState, pending: list[Job], why: str) -> None:
    """The case in flight is an error; with none in flight (the child ended between
    cases, no progress to build on) every pending case not yet reported is."""
    child = state.child
    assert child is not None
    if state.current is not None:
        state.outcomes[state.current.index] = Outcome(
            error=why, output_bytes=child.output.total, output_tail=child.output.text())
        return
    for job in pending:
        if job.index not in state.outcomes:
            state.outcomes[job.index] = Outcome(error=f"not run: {why}")


def _finished_case(child: _Child, ev: dict, job: Job, tmp: str) -> Outcome:
    """The outcome of ``job`` from its ``done`` message (and the arrays it saved)."""
    child.end_case()
    arrays = None
    if ev.get("arrays"):
        arrays = _read_arrays(Path(tmp) / f"case{job.index}.npz")
    return Outcome(report=ev["report"], output_bytes=child.output.total,
                   output_tail=child.output.text(), arrays=arrays)


def _collect_cases(state: _RunState, pending: list[Job], tmp: str, timeout: float) -> None:
    """Read the loaded child's messages into ``state.outcomes`` until it ends, stalls,
    floods or its case overruns ``timeout``."""
    child = state.child
    assert child is not None
    deadline = time.monotonic() + timeout
    by_index = {j.index: j for j in pending}
    while True:
        ev = child.event(deadline)
        if _is_event(ev, "start") and ev.get("index") in by_index and state.current is None:
            state.current = by_index[ev["index"]]
            child.begin_case()
            deadline = time.monotonic() + timeout
        elif (_is_event(ev, "done") and state.current is not None
              and isinstance(ev.get("report"), dict)):
            state.outcomes[state.current.index] = _finished_case(child, ev, state.current, tmp)
            state.current = None
        elif _is_event(ev, "end"):
            child.finish()
            return
        elif not isinstance(ev, dict):
            why = _stream_failure(child, ev, between_cases=state.current is None,
                                  timeout=timeout)
            _record_failure(state, pending, why)
            return


def _record_interrupt(state: _RunState, jobs: Sequence[Job]) -> None:
    """After Ctrl-C: close the child; the case in flight and every case not
    finished are errors saying so."""
    state.result.interrupted = True
    if state.child is not None:
        captured = state.child.output
        state.child.close()
        current = state.current
        if current is not None and current.index not in state.outcomes:
            state.outcomes[current.index] = Outcome(
                error="interrupted (Ctrl-C) while this case ran",
                output_bytes=captured.total, output_tail=captured.text())
    for job in jobs:
        if job.index not in state.outcomes:
            state.outcomes[job.index] = Outcome(error="not run: interrupted (Ctrl-C)")


def run(op: str, jobs: Sequence[Job], *, candidate: str, vjp: str | None, framework: str,
        timeout: float, keep_arrays: bool = False, against: str = "reference",
        unbatched: bool = False) -> RunResult:
    """Run ``jobs`` in child processes; see the module docstring.

    Raises
    ------
    LoadError : the first child could not import the TARGETs (or ended or
        hung while importing them); nothing ran.
    """
    state = _RunState(outcomes={}, result=RunResult(outcomes=[]))
    pending = list(jobs)
    first = True
    with tempfile.TemporaryDirectory(prefix="refimpl-validate-") as tmp:
        try:
            while pending:
                job_file = _write_job_file(tmp, pending, op=op, candidate=candidate, vjp=vjp,
                                           framework=framework, keep_arrays=keep_arrays,
                                           against=against, unbatched=unbatched)
                child = state.child = _Child(job_file)
                state.current = None
                loaded, started = _await_load(child, timeout)
                if not _is_event(loaded, "loaded"):
                    why = _load_failure(child, loaded, started=started, timeout=timeout)
                    tail = child.output.text().strip()
                    child.close()
                    state.child = None
                    if first:
                        if tail and not isinstance(loaded, dict):
                            why += "; its last output: " + tail[-500:].replace("\n", " | ")
                        raise LoadError(why)
                    for job in pending:
                        state.outcomes[job.index] = Outcome(
                            error=f"not run: restarting after a previous case failed: {why}")
                    break
                first = False
                state.result.framework_version = str(loaded.get("version", "?"))
                state.result.notes = list(loaded.get("notes", []))
                _collect_cases(state, pending, tmp, timeout)
                child.close()
                state.child = None
                state.current = None
                pending = [j for j in pending if j.index not in state.outcomes]
        except KeyboardInterrupt:
            _record_interrupt(state, jobs)
        finally:
            if state.child is not None:
                state.child.close()
    state.result.outcomes = [state.outcomes[j.index] for j in jobs]
    return state.result


def _read_arrays(path: Path) -> dict | None:
    """The candidate's arrays the child saved for ``--dump`` (never unpickled)."""
    import numpy as np
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.array(npz[k], dtype=np.float64) for k in npz.files}
    except Exception:       # a file the candidate spoiled: the dump simply lacks it
        return None


# --------------------------------------------------------------------------
# The child
# --------------------------------------------------------------------------

def _send(fd: int, msg: dict) -> None:
    data = (json.dumps(msg) + "\n").encode("utf-8")
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _watch_parent(ctl: int) -> None:
    """End this process once the parent's end of the control pipe closes."""
    try:
        while os.read(ctl, 4096):
            pass
    except OSError:
        pass
    os._exit(70)


def _child_main(argv: Sequence[str]) -> None:
    msg_fd, ack_fd, job_file = int(argv[0]), int(argv[1]), Path(argv[2])
    ctl = os.dup(0)                         # the parent's pipe: EOF means the parent is gone
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)                     # a candidate reading stdin gets EOF, not the pipe
    os.close(devnull)
    threading.Thread(target=_watch_parent, args=(ctl,), daemon=True).start()

    job = pickle.loads(job_file.read_bytes())
    for p in job["sys_path"]:
        if p not in sys.path:
            sys.path.append(p)

    import numpy as np

    from . import registry
    from . import validate as v

    _send(msg_fd, {"event": "ready"})     # refimpl imported: the TARGET's time starts now
    try:
        fw = v._framework(job["framework"])
        fn = v.load_target(job["candidate"])
        vjp = v.load_target(job["vjp"], what="--vjp TARGET") if job["vjp"] else None
        spec = registry.get_spec(job["op"])
    except (ValueError, KeyError) as exc:
        _send(msg_fd, {"event": "target_error", "message": str(exc)})
        os._exit(0)
    _send(msg_fd, {"event": "loaded", "version": fw.version()})
    with fw.context():
        for j in job["jobs"]:
            _send(msg_fd, {"event": "start", "index": j.index})
            if not os.read(ack_fd, 1):      # the parent is gone
                os._exit(70)
            keep: dict | None = {} if job["keep_arrays"] else None
            report = v._run_one(spec, j.case, fn, fw, vjp, j.ftol, j.gtol, job["against"], keep,
                                job.get("unbatched", False))
            saved = False
            if keep and not report.passed:
                try:
                    np.savez(Path(job["tmp"]) / f"case{j.index}.npz", **keep)
                    saved = True
                except Exception:
                    saved = False
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            _send(msg_fd, {"event": "done", "index": j.index, "report": v._report_dict(report),
                           "arrays": saved})
    _send(msg_fd, {"event": "end"})
    os._exit(0)     # no atexit handlers of the candidate's libraries


if __name__ == "__main__":
    _child_main(sys.argv[1:])
