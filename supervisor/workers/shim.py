"""One step of a leased attempt, fenced on its own host: the step's session leader. I/O edge.

    python -I -S .../supervisor/workers/shim.py --attempt-id A --lease-fd 3 --status-fd 4 \
        --lease-s S --kill-grace-s G --spool DIR [--cwd DIR] [--exec-status-fd 3] -- argv...

(`python -m supervisor.workers.shim` works too; the agent runs it in isolated mode, -I
-S, with its package's directory put on sys.path, so that it starts fast, compiled once,
from any working directory and whatever the task's PYTHONPATH.)

An agent with a lease (a worker on another host) starts each step of an attempt under a
shim rather than directly. The shim leads the step's session and is a child subreaper, so
every process of the step stays its descendant; it starts the command in a process group
of its own (pid = pgid, as a step started by the agent directly), passes the command's exit
status back as its own (the same code, or death by the same signal), and reads the lease
pipe from its agent: every byte renews the lease; `K<grace>\\n` is the agent's own kill
request. At end of file on that pipe (the agent is gone) or after --lease-s without a
byte (the agent is stopped, or its daemon went silent) the shim fences: SIGTERM to the
step's tree (its session, its descendants and every process carrying the attempt's marker),
SIGKILL after --kill-grace-s, a sweep, and the outcome written to the host-local spool as
`<attempt id>.json`, which an agent reports to its daemon (a Finished with fenced set).
So an attempt the daemon has given up never keeps running: not when its agent is
partitioned away, killed, or stopped.

The agent learns how the start went on --status-fd: `started <pid> <start ticks>` once
the command runs, or `error <text>` when it could not start (the shim then exits 127).

Only the standard library is imported, and as little of it as possible: the shim is on
the spawn path of every step of a remote attempt.
"""

from __future__ import annotations

import os
import select
import sys
import time

TYPE_CHECKING = False  # as typing.TYPE_CHECKING (type checkers know it), without typing
if TYPE_CHECKING:
    import signal
else:
    # The C module itself: `signal` wraps it in enums, whose import alone costs more than
    # the rest of the shim's start.
    import _signal as signal

MARKER_ENV = "ORCHD_ATTEMPT_ID"  # as supervisor.workers.proctree.MARKER_ENV
EXEC_FAILED = 127
KILL = b"K"
_PR_SET_CHILD_SUBREAPER = 36
_SWEEP_ROUNDS = 5
_SWEEP_WAIT_S = 1.0
# Signals Python ignores itself and a command must start with at their default.
_RESTORED = tuple(
    getattr(signal, n) for n in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, n)
)


class Options:
    """The shim's command line (parsed by hand: argparse alone costs milliseconds)."""

    attempt_id = ""
    lease_fd = -1
    status_fd = -1
    exec_status_fd = -1
    lease_s = 0.0
    kill_grace_s = 5.0
    spool = ""
    cwd: str | None = None
    argv: list[str]


def parse(args: list[str]) -> Options:
    """Options from `args`; raises ValueError naming what is wrong."""
    opts = Options()
    ints = {
        "--lease-fd": "lease_fd",
        "--status-fd": "status_fd",
        "--exec-status-fd": "exec_status_fd",
    }
    floats = {"--lease-s": "lease_s", "--kill-grace-s": "kill_grace_s"}
    strs = {"--attempt-id": "attempt_id", "--spool": "spool", "--cwd": "cwd"}
    i = 0
    while i < len(args) and args[i] != "--":
        flag = args[i]
        if i + 1 >= len(args):
            raise ValueError(f"{flag} needs a value")
        value = args[i + 1]
        if flag in ints:
            setattr(opts, ints[flag], int(value))
        elif flag in floats:
            setattr(opts, floats[flag], float(value))
        elif flag in strs:
            setattr(opts, strs[flag], value)
        else:
            raise ValueError(f"unknown option {flag}")
        i += 2
    opts.argv = args[i + 1 :]
    if not opts.argv:
        raise ValueError("no command given after --")
    if not opts.attempt_id:
        raise ValueError("--attempt-id is required")
    return opts


# --- the step's processes --------------------------------------------------------------


def _stat(pid: int) -> tuple[bytes, int, int, int, int] | None:
    """(state, ppid, pgrp, session, start ticks) of `pid`, None when it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    f = data[data.rindex(b")") + 2 :].split(None, 20)
    return f[0], int(f[1]), int(f[2]), int(f[3]), int(f[19])


def _marked(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return False  # gone, or not ours
    return (b"\0" + env).find(needle) >= 0


class Tree:
    """The step's processes: this session, this shim's descendants, the marked ones."""

    def __init__(self, attempt_id: str) -> None:
        self.me = os.getpid()
        self.needle = b"\0" + f"{MARKER_ENV}={attempt_id}".encode() + b"\0"
        # Reaped exit statuses, by pid (the shim is the subreaper: it reaps them all).
        self.statuses: dict[int, int] = {}

    def reap(self) -> bool:
        """Wait for every exited child; True while children remain."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
            self.statuses[pid] = status

    def wait_for(self, pid: int) -> int | None:
        """The wait status of child `pid`, waiting for it if it was not reaped yet."""
        if pid not in self.statuses:
            try:
                self.statuses[pid] = os.waitpid(pid, 0)[1]
            except ChildProcessError:
                return None
        return self.statuses[pid]

    def members(self) -> dict[int, int]:
        """Live (not zombie) processes of the step, as pid -> start ticks."""
        stats: dict[int, tuple[bytes, int, int, int, int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.me:
                st = _stat(int(entry))
                if st is not None:
                    stats[int(entry)] = st
        found: dict[int, int] = {}
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _, sid, ticks) in stats.items():
            children.setdefault(ppid, []).append(pid)
            if sid == self.me:
                found[pid] = ticks
        todo = list(children.get(self.me, ()))
        while todo:
            pid = todo.pop()
            found[pid] = stats[pid][4]
            todo += children.get(pid, ())
        for pid, st in stats.items():
            if pid not in found and _marked(pid, self.needle):
                found[pid] = st[4]
        return {p: t for p, t in found.items() if stats[p][0] != b"Z"}

    def signal(self, pid: int, ticks: int, sig: int) -> bool:
        """Signal `pid` if it still is the process that started at `ticks` (through a pidfd,
        so a reused pid number is never hit)."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return False
        try:
            st = _stat(pid)
            if st is None or st[4] != ticks:
                return False
            signal.pidfd_send_signal(fd, sig)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def wait_gone(self, procs: dict[int, int], timeout_s: float) -> dict[int, int]:
        """Reap and poll until every one of `procs` is gone; those still alive after."""
        deadline = time.monotonic() + timeout_s
        interval = 0.002
        while True:
            self.reap()
            procs = {p: t for p, t in procs.items() if _alive(p, t)}
            if not procs or time.monotonic() >= deadline:
                return procs
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 2, 0.05)

    def kill(self, grace_s: float) -> tuple[list[int], list[tuple[int, int]]]:
        """SIGTERM (and SIGCONT) the tree, SIGKILL what is left after `grace_s`, sweep until
        nothing is left; (pids signalled, survivors as (pid, start ticks))."""
        signalled: set[int] = set()
        procs = self.members()
        for pid, ticks in procs.items():
            if self.signal(pid, ticks, signal.SIGTERM):
                signalled.add(pid)
                self.signal(pid, ticks, signal.SIGCONT)
        left = self.wait_gone(procs, grace_s)
        for pid, ticks in left.items():
            self.signal(pid, ticks, signal.SIGKILL)
        self.wait_gone(left, _SWEEP_WAIT_S)
        # What was forked meanwhile, or re-parented to us on the way.
        for _ in range(_SWEEP_ROUNDS):
            left = self.members()
            if not left:
                break
            for pid, ticks in left.items():
                if self.signal(pid, ticks, signal.SIGKILL):
                    signalled.add(pid)
            left = self.wait_gone(left, _SWEEP_WAIT_S)
        self.reap()
        return sorted(signalled), sorted(left.items())


def _alive(pid: int, ticks: int) -> bool:
    st = _stat(pid)
    return st is not None and st[4] == ticks and st[0] != b"Z"


# --- start, serve, end -----------------------------------------------------------------


def start(opts: Options) -> int:
    """Fork and exec the command in a process group of its own; its pid. Raises OSError
    with the reason when it could not start."""
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing here may return
        try:
            os.close(err_r)
            os.setpgid(0, 0)
            for sig in (*_RESTORED, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            if opts.cwd is not None:
                os.chdir(opts.cwd)
            if opts.exec_status_fd >= 0:
                # An exec wrapper (the limits one) reports its own failed exec on this fd.
                os.dup2(err_w, opts.exec_status_fd)
            os.execvp(opts.argv[0], opts.argv)
        except BaseException as exc:
            text = (
                f"{exc}" if isinstance(exc, OSError) and exc.filename else f"{opts.argv[0]}: {exc}"
            )
            try:
                os.write(err_w, text.encode(errors="replace"))
            finally:
                os._exit(EXEC_FAILED)
    os.close(err_w)
    chunks = []
    while data := os.read(err_r, 4096):
        chunks.append(data)
    os.close(err_r)
    if chunks:
        os.waitpid(pid, 0)
        raise OSError(b"".join(chunks).decode(errors="replace"))
    return pid


class Outcome:
    """How the wait ended: the command exited, a kill was asked for, or a fence is due."""

    def __init__(self, kind: str, grace_s: float = 0.0, why: str = "") -> None:
        self.kind, self.grace_s, self.why = kind, grace_s, why


def serve(opts: Options, pid: int, wake_fd: int) -> Outcome:
    """Wait for the command's end, the agent's kill request, a signal or the lease's end."""
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    poller.register(wake_fd, select.POLLIN)
    if opts.lease_fd >= 0:
        poller.register(opts.lease_fd, select.POLLIN)
    deadline = time.monotonic() + opts.lease_s
    pending = b""
    while True:
        timeout = None
        if opts.lease_s > 0:
            timeout = max(0, int((deadline - time.monotonic()) * 1000) + 1)
        events = poller.poll(timeout)
        if not events and opts.lease_s > 0 and time.monotonic() >= deadline:
            return Outcome("fence", why="lease_expired")
        for fd, _ in events:
            if fd == pidfd:
                return Outcome("exited")
            if fd == wake_fd:
                os.read(wake_fd, 64)
                return Outcome("kill", grace_s=opts.kill_grace_s, why="signal")
            data = os.read(fd, 4096)
            if not data:
                return Outcome("fence", why="agent_gone")
            deadline = time.monotonic() + opts.lease_s
            pending = (pending + data)[-64:]
            at = pending.find(KILL)
            if at >= 0 and b"\n" in pending[at:]:
                word = pending[at + 1 : pending.index(b"\n", at)]
                try:
                    grace_s = float(word)
                except ValueError:
                    grace_s = opts.kill_grace_s
                if not 0 <= grace_s < float("inf"):  # also NaN
                    grace_s = opts.kill_grace_s
                return Outcome("kill", grace_s=grace_s, why="agent")


def write_spool(
    opts: Options, why: str, status: int | None, survivors: list[tuple[int, int]]
) -> None:
    """Record a fence in the spool (atomically: a reader sees all of it or nothing)."""
    import json  # only a fence needs it

    code = os.waitstatus_to_exitcode(status) if status is not None else None
    record = {
        "attempt_id": opts.attempt_id,
        "fenced": True,
        "why": why,
        "when": time.time(),
        "exit_code": code if code is not None and code >= 0 else None,
        "signal": -code if code is not None and code < 0 else None,
        "survivors": survivors,
    }
    path = os.path.join(opts.spool, f"{opts.attempt_id}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def exit_as(status: int | None) -> None:
    """End this process the way the command ended: its exit code, or its signal."""
    if status is None:
        os._exit(EXEC_FAILED)
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        os._exit(code)
    sig = -code
    import resource  # only a death by signal needs it

    # The command may have dumped core; the shim must not add one of its own.
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    if sig not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (sig,))
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)  # a signal that does not end a process: say which by the code


def _become_subreaper() -> None:
    """PR_SET_CHILD_SUBREAPER: orphans of the step re-parent to the shim, not to init.

    Through _ctypes, the C module alone: importing ctypes (and struct, types, warnings
    with it) would cost about as much as the rest of the shim's start."""
    import _ctypes

    native = getattr(_ctypes, "dlopen", None)
    if native is not None:
        prctl = _ctypes.dlsym(native(None, 0), "prctl")
        _ctypes.call_function(prctl, (_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0))
        return
    import ctypes

    ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def main(args: list[str] | None = None) -> None:
    try:
        opts = parse(sys.argv[1:] if args is None else args)
    except ValueError as exc:
        sys.stderr.write(f"supervisor.workers.shim: {exc}\n")
        os._exit(2)
    for fd in (opts.lease_fd, opts.status_fd):
        if fd >= 0:
            os.set_inheritable(fd, False)
    _become_subreaper()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    try:
        pid = start(opts)
    except OSError as exc:
        _tell(opts.status_fd, f"error {exc}\n")
        os._exit(EXEC_FAILED)
    tree = Tree(opts.attempt_id)
    st = _stat(pid)
    # The agent may be gone already: then the lease pipe's end fences the step below.
    _tell(opts.status_fd, f"started {pid} {st[4] if st else 0}\n")
    try:
        outcome = serve(opts, pid, wake_r)
    except Exception as exc:
        # Whatever went wrong, the shim never leaves its step running unsupervised.
        _complain(f"fencing after an error of the shim's own: {exc!r}")
        outcome = Outcome("fence", why=f"shim_error: {exc}")
    if outcome.kind == "exited":
        # A subreaper with no child left has no descendant left: the usual end costs no scan.
        if tree.reap() and tree.members():
            # What the finished command left behind goes too (as the agent does itself).
            tree.kill(opts.kill_grace_s)
    elif outcome.kind == "kill":
        tree.kill(outcome.grace_s)
    else:
        _, survivors = tree.kill(opts.kill_grace_s)
        try:
            write_spool(opts, outcome.why, tree.wait_for(pid), survivors)
        except OSError as exc:
            _complain(f"the fence of {opts.attempt_id} could not be recorded: {exc}")
    exit_as(tree.wait_for(pid))


def _tell(fd: int, line: str) -> None:
    """One line to the agent on the status pipe, which is closed after."""
    if fd < 0:
        return
    try:
        os.write(fd, line.encode(errors="replace"))
    except OSError:
        pass
    finally:
        os.close(fd)


def _complain(text: str) -> None:
    """A line of the shim's own in the step's log (its stderr)."""
    try:  # noqa: SIM105 - contextlib's import would cost the shim's start
        os.write(2, f"supervisor.workers.shim: {text}\n".encode(errors="replace"))
    except OSError:
        pass


if __name__ == "__main__":
    main()
