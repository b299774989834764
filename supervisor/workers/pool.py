"""The daemon's side of the workers: spawn agents, carry their messages, kill them. I/O edge.

Each agent is `python -m supervisor.workers.agent` in its own session, with frames on its stdin
and stdout and its stderr appended to `logs/workers/<id>.log`. Every process the pool
starts gets a generation number, and every message it reads is delivered to the inbox
tagged with it, so the engine can tell a replaced process's late words from the current
one's. The pool decides nothing: it reports, and it does what it is told.

An agent on another host is started through its host's transport (`ssh … host --`, or
any argv that gives a byte stream), with a lease: the pool sends it a Lease frame every
heartbeat interval once its Sweep went out (unless told to hold its leases back: Renew),
asks it to stream its attempts' output, and appends the Output frames to the task's log
here (never through the engine: they are not state). The transport's stderr (ssh's
errors, the agent's own log lines) goes to the worker's log, and its last line comes
with the exit (`transport_failed` names it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import msgspec
import psutil
import structlog
from anyio.abc import Process, TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

import supervisor
from supervisor import failpoints
from supervisor.core import wire
from supervisor.core.config import HostConfig
from supervisor.core.effects import OldAgent, TaskTree
from supervisor.core.inputs import AgentExited, AgentMessage
from supervisor.workers import cgroup as cgroups
from supervisor.workers import proctree
from supervisor.workers.launch import ORIGINAL_PYTHONPATH_ENV

log = structlog.get_logger("orchd.pool")

# A send to an agent that does not read (stopped, wedged) must not stall the engine.
SEND_TIMEOUT_S = 5.0
# The longest line of a transport's stderr kept for its exit's event.
STDERR_LINE_MAX = 500
_PACKAGE_ROOT = str(Path(supervisor.__file__).resolve().parent.parent)


Inbox = MemoryObjectSendStream[AgentMessage | AgentExited]
# Processes that outlived a kill, as (pid, start ticks).
Survivors = tuple[tuple[int, int], ...]


@dataclass(eq=False)
class _Agent:
    worker_id: str
    generation: int
    process: Process
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    # Remote agents only: the host, whether its leases are renewed (from its Sweep on,
    # unless held back), the task log of each attempt it streams, its stderr's last line.
    host: str = ""
    leasing: bool = False
    withheld: bool = False
    logs: dict[str, str] = field(default_factory=dict)
    stderr_tail: str = ""
    stderr_done: anyio.Event = field(default_factory=anyio.Event)


class Pool:
    """Agent processes by worker id; start with `await tg.start(pool.run)`."""

    def __init__(
        self,
        *,
        python: str,
        log_dir: Path,
        heartbeat_s: float,
        inbox: Inbox,
        kill_grace_s: float = 5.0,
        daemon_id: str = "",
    ) -> None:
        self._python = python
        self._daemon_id = daemon_id
        self._log_dir = Path(log_dir)
        self._heartbeat_s = heartbeat_s
        self._inbox = inbox
        self._kill_grace_s = kill_grace_s
        self._agents: dict[str, _Agent] = {}
        self._generations = itertools.count(1)
        self._tg: TaskGroup | None = None
        self._env = agent_env(dict(os.environ))
        self._may_kill = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the agents' reader tasks; on cancellation stop every agent (Stop, then a kill
        only once `shutdown_recorded` said the workers' shutdown is on record)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._keepalive)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None
                with anyio.CancelScope(shield=True):
                    await self._stop_all()

    async def spawn(
        self,
        worker_id: str,
        host: HostConfig | None = None,
        *,
        lease_s: float = 0.0,
        kill_grace_s: float | None = None,
    ) -> int:
        """Start an agent for `worker_id` (replacing any previous one), here or on `host`
        through its transport with leases of `lease_s`, and a kill grace of `kill_grace_s`
        (the pool's by default); its generation. Raises OSError when the process (the
        transport, for a remote one) cannot be started."""
        if self._tg is None:
            raise RuntimeError("Pool.run is not running")
        generation = next(self._generations)
        log_path = self._log_dir / "workers" / f"{worker_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        agent_args = [
            "-m",
            "supervisor.workers.agent",
            "--worker-id",
            worker_id,
            "--heartbeat-s",
            repr(self._heartbeat_s),
            "--kill-grace-s",
            repr(self._kill_grace_s if kill_grace_s is None else kill_grace_s),
        ]
        if host is None:
            argv = [self._python, *agent_args, "--log", str(log_path)]
        else:
            argv = [
                *remote_argv(host.transport, host.host),
                host.python,
                *agent_args,
                "--lease-s",
                repr(lease_s),
                *(["--daemon-id", self._daemon_id] if self._daemon_id else []),
            ]
        if failpoints.take("spawn_fail"):
            raise OSError(errno.EAGAIN, "spawn refused by the spawn_fail failpoint")
        with open(log_path, "ab") as log_file:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                # A remote agent's stderr is read here: its transport's last words matter.
                stderr=log_file if host is None else subprocess.PIPE,
                env=self._env,
                start_new_session=True,
            )
        agent = _Agent(worker_id, generation, process, host="" if host is None else host.host)
        previous = self._agents.get(worker_id)
        if previous is not None and previous.process.returncode is None:
            log.warning("agent_replaced_while_alive", worker_id=worker_id, pid=previous.process.pid)
        self._agents[worker_id] = agent
        log.info(
            "agent_spawned",
            worker_id=worker_id,
            generation=generation,
            pid=process.pid,
            host=agent.host or None,
        )
        if host is None:
            agent.stderr_done.set()
        else:
            self._tg.start_soon(self._copy_stderr, agent, log_path)
        self._tg.start_soon(self._watch, agent)
        return generation

    def configure(self, *, heartbeat_s: float, kill_grace_s: float) -> None:
        """A reloaded config: agents started from now on get this heartbeat interval and
        kill grace (running ones keep theirs), and remote agents' Lease frames follow the
        new interval."""
        self._heartbeat_s, self._kill_grace_s = heartbeat_s, kill_grace_s

    def renew(self, worker_id: str, on: bool) -> None:
        """Go on sending the remote agent Lease frames (`on`), or hold them back (its
        worker is unresponsive: its shims fence once agent_lease_s pass)."""
        agent = self._agents.get(worker_id)
        if agent is not None:
            agent.withheld = not on

    async def send(self, worker_id: str, msg: wire.ToAgent) -> bool:
        """Send one message to the worker's current agent; False if it is gone or not reading.
        A remote agent streams its attempts' output back (Run.stream_output), and its
        leases are renewed from its Sweep on."""
        agent = self._agents.get(worker_id)
        if agent is None or agent.process.returncode is not None:
            return False
        if agent.host and isinstance(msg, wire.Run):
            agent.logs[msg.attempt_id] = msg.log_path
            msg = msgspec.structs.replace(msg, stream_output=True)
        stdin = agent.process.stdin
        assert stdin is not None
        try:
            async with agent.lock:
                with anyio.fail_after(SEND_TIMEOUT_S):
                    await stdin.send(wire.frame(msg))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, TimeoutError):
            log.warning("agent_send_failed", worker_id=worker_id, message=type(msg).__name__)
            return False
        if isinstance(msg, wire.Sweep):
            agent.leasing = True
        return True

    async def kill(
        self,
        worker_id: str,
        *,
        task_tree: TaskTree | None,
        grace_s: float,
    ) -> Survivors:
        """Kill the attempt's tree, then the worker's agent (TERM, KILL after grace_s), then
        sweep the tree once more; the tree's survivors, as (pid, start ticks). Needs nothing
        from the agent, so it works on one that is stopped or wedged.

        The tree goes first: the agent is a child subreaper, so the attempt's orphans (a
        `setsid` escapee with a cleared environment, which neither its group nor the marker
        finds) are its children, and /proc lists them even while it is stopped. Once the
        agent died they would be re-parented to init, out of anyone's sight."""
        agent = self._agents.get(worker_id)
        survivors: Survivors = ()
        if task_tree is not None:
            parent = _live_child(agent)
            survivors = await self._kill_tree(task_tree, grace_s, children_of=parent)
        if agent is not None:
            await self._kill_agent(agent, grace_s)
        if task_tree is not None:
            # Whatever was forked meanwhile or re-parented as the agent died: one more sweep.
            again = await self._kill_tree(task_tree, 0.0)
            survivors = await anyio.to_thread.run_sync(
                proctree.living, sorted(set(survivors) | set(again))
            )
        return survivors

    async def kill_old_life(
        self, agents: list[OldAgent], trees: list[TaskTree], grace_s: float
    ) -> dict[str, Survivors]:
        """Kill what a previous life of the daemon left running, all at once (one grace for
        all of it): every attempt's tree (each with the descendants of the old agent that
        ran it), then the old agents themselves (each found by pid + start ticks, never by
        pid alone), then one more sweep of each tree. The survivors by attempt marker."""

        def find_agents() -> dict[str, psutil.Process]:
            found = {}
            for a in agents:
                proc = proctree.verified(
                    a.pid, a.start_ticks, legacy_create_time=a.legacy_create_time
                )
                if proc is not None:
                    found[a.worker_id] = proc
            return found

        live = await anyio.to_thread.run_sync(find_agents)
        ran = {
            a.attempt_id: live[a.worker_id] for a in agents if a.attempt_id and a.worker_id in live
        }
        markers = {t.marker for t in trees}
        out: dict[str, Survivors] = {}

        async def one(tree: TaskTree, parent: psutil.Process | None) -> None:
            out[tree.marker] = await self._kill_tree(tree, grace_s, children_of=parent)

        async def orphans_of(proc: psutil.Process) -> None:
            # An old agent with no attempt of record: whatever it had adopted goes too.
            await anyio.to_thread.run_sync(
                lambda: proctree.kill_tree(None, None, None, None, grace_s, children_of=proc)
            )

        async with anyio.create_task_group() as tg:
            for tree in trees:
                tg.start_soon(one, tree, ran.get(tree.marker))
            for a in agents:
                # A remote agent's transport has no attempt under it here.
                if a.worker_id in live and a.attempt_id not in markers and not a.remote:
                    tg.start_soon(orphans_of, live[a.worker_id])
        async with anyio.create_task_group() as tg:
            for wid, proc in live.items():
                tg.start_soon(self._kill_old_agent, wid, proc, grace_s)

        async def sweep(tree: TaskTree) -> None:
            again = await self._kill_tree(tree, 0.0)
            out[tree.marker] = await anyio.to_thread.run_sync(
                proctree.living, sorted(set(out.get(tree.marker, ())) | set(again))
            )

        async with anyio.create_task_group() as tg:
            for tree in trees:
                tg.start_soon(sweep, tree)
        return out

    async def _kill_old_agent(self, worker_id: str, proc: psutil.Process, grace_s: float) -> None:
        gone = await anyio.to_thread.run_sync(proctree.kill_process, proc, grace_s)
        log.info("old_agent_killed", worker_id=worker_id, pid=proc.pid, gone=gone)

    async def kill_survivors(self, survivors: Survivors) -> Survivors:
        """SIGKILL again the survivors of an earlier kill that are still the same processes
        (pid + start ticks); those still there."""
        return await anyio.to_thread.run_sync(proctree.kill_survivors, survivors)

    def shutdown_recorded(self) -> None:
        """Every worker's shutdown is durable: from now on the pool may kill an agent that
        does not stop when asked (before that, on an exit with no such record, it only
        closes the agents' pipes and they stop by themselves)."""
        self._may_kill = True

    async def stop(self, worker_id: str, grace_s: float, *, kill: bool = True) -> bool:
        """Ask the agent to stop (it kills its attempt first); kill it if it is not gone
        within grace_s and a little more (only when `kill`: a record says why). True when
        it exited by itself, as asked."""
        agent = self._agents.get(worker_id)
        if agent is None or agent.process.returncode is not None:
            return False
        asked = await self.send(worker_id, wire.Stop(grace_s=grace_s))
        if asked:
            with anyio.move_on_after(grace_s + 2.0):
                await agent.process.wait()
        by_itself = asked and agent.process.returncode == 0
        if agent.process.returncode is None:
            log.warning("agent_stop_timeout", worker_id=worker_id, pid=agent.process.pid, kill=kill)
            if kill:
                await self._kill_agent(agent, 0.0)
        await _close(agent)
        return by_itself

    def identity(self, worker_id: str) -> tuple[int, int] | None:
        """(pid, start ticks) of the worker's running agent, if there is one."""
        pid = self.pid(worker_id)
        return None if pid is None else proctree.process_identity(pid)

    def pid(self, worker_id: str) -> int | None:
        """The pid of the worker's running agent, if there is one."""
        agent = self._agents.get(worker_id)
        if agent is None or agent.process.returncode is not None:
            return None
        return agent.process.pid

    # --- internals -------------------------------------------------------------------------

    async def _watch(self, agent: _Agent) -> None:
        """Deliver the agent's messages, then its exit (always in that order)."""
        stdout = agent.process.stdout
        assert stdout is not None
        reader = BufferedByteReceiveStream(stdout)
        inbox_open = True
        try:
            while True:
                header = await reader.receive_exactly(4)
                body = await reader.receive_exactly(wire.frame_length(header))
                msg: wire.FromAgent = wire.from_agent_decoder.decode(body)
                if isinstance(msg, wire.Output):
                    await self._output(agent, msg)
                    continue
                if isinstance(msg, wire.Finished):
                    agent.logs.pop(msg.attempt_id, None)  # its Output came before it
                await self._inbox.send(AgentMessage(agent.worker_id, agent.generation, msg))
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.ClosedResourceError):
            pass  # the agent closed its end: it is exiting
        except (ValueError, msgspec.DecodeError) as exc:
            log.error("agent_protocol_error", worker_id=agent.worker_id, error=str(exc))
            # No signal without a record of why: at EOF on its stdin the agent kills its
            # attempt and exits; one that does not goes silent, and health retires it.
            await _hang_up(agent)
        except anyio.BrokenResourceError:
            inbox_open = False
        returncode = await agent.process.wait()
        with anyio.move_on_after(2.0):  # the transport's last words (an escaped child may hold it)
            await agent.stderr_done.wait()
        await _close(agent)
        if self._agents.get(agent.worker_id) is agent:
            del self._agents[agent.worker_id]
        log.info(
            "agent_exited",
            worker_id=agent.worker_id,
            returncode=returncode,
            stderr=agent.stderr_tail or None,
        )
        if inbox_open:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._inbox.send(
                    AgentExited(agent.worker_id, agent.generation, returncode, agent.stderr_tail)
                )

    async def _output(self, agent: _Agent, msg: wire.Output) -> None:
        """A piece of an attempt's output from a remote agent, appended to the task's log
        here; only for an attempt that was given to that agent (the frame names no path)."""
        path = agent.logs.get(msg.attempt_id)
        if path is None:
            log.warning(
                "output_for_unknown_attempt", worker_id=agent.worker_id, attempt_id=msg.attempt_id
            )
            return
        try:
            await anyio.to_thread.run_sync(_append, path, msg.data)
        except OSError as exc:  # a full disk loses log lines, never the daemon
            log.warning("task_log_failed", attempt_id=msg.attempt_id, error=str(exc))

    async def _copy_stderr(self, agent: _Agent, log_path: Path) -> None:
        """A remote agent's stderr (its transport's errors, the agent's own log lines)
        into the worker's log, keeping the last line for its exit."""
        stream = agent.process.stderr
        assert stream is not None
        rest = b""
        try:
            with open(log_path, "ab", buffering=0) as out:
                async for chunk in stream:
                    out.write(chunk)
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()[-STDERR_LINE_MAX:]
                    last = next((ln for ln in reversed(lines) if ln.strip()), None)
                    if last is not None:
                        agent.stderr_tail = _line(last)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            if rest.strip():
                agent.stderr_tail = _line(rest)
            agent.stderr_done.set()

    async def _keepalive(self) -> None:
        """A Lease to every remote agent each heartbeat interval (every frame renews its
        attempts' leases), from its Sweep on and unless its leases are held back."""
        while True:
            await anyio.sleep(self._heartbeat_s)
            assert self._tg is not None
            for agent in list(self._agents.values()):
                if (
                    agent.host
                    and agent.leasing
                    and not agent.withheld
                    and agent.process.returncode is None
                    and not agent.lock.locked()  # a send is under way: that renews too
                ):
                    self._tg.start_soon(self.send, agent.worker_id, wire.Lease())

    async def _kill_agent(self, agent: _Agent, grace_s: float) -> None:
        process = agent.process
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
            # A stopped agent would hold the TERM pending for ever: let it act on it.
            os.kill(process.pid, signal.SIGCONT)
        with anyio.move_on_after(grace_s):
            await process.wait()
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        await _close(agent)
        log.info("agent_killed", worker_id=agent.worker_id, returncode=process.returncode)

    async def _kill_tree(
        self,
        tree: TaskTree,
        grace_s: float,
        *,
        children_of: psutil.Process | None = None,
    ) -> Survivors:
        """Kill one attempt's tree in process mode (session + subreaper + marker sweep); its
        survivors. The log line gives when it began and ended, so that kills meant to run
        together can be seen to overlap. An attempt with a cgroup is killed through it."""
        if tree.cgroup is not None:
            # The branch point between the two containments: the cgroup holds every process
            # of the attempt, wherever it was re-parented (the agent is not in it).
            return await self._kill_cgroup(tree.cgroup, grace_s)
        began = time.monotonic()
        report = await anyio.to_thread.run_sync(
            lambda: proctree.kill_tree(
                tree.pgid,
                tree.pid,
                tree.start_ticks,
                tree.marker,
                grace_s,
                children_of=children_of,
                legacy_create_time=tree.legacy_create_time,
            )
        )
        # If this daemon is a subreaper, the killed processes may be its zombies now; they
        # are never agents (those are waited for by their process objects).
        for killed in report.signalled:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(killed, os.WNOHANG)
        if report.signalled or report.survivors:
            (log.error if report.survivors else log.info)(
                "task_tree_killed",
                marker=tree.marker,
                pids=list(report.signalled),
                survivors=report.survivor_pids,
                grace_s=grace_s,
                began=round(began, 4),
                ended=round(time.monotonic(), 4),
            )
        return report.survivors

    async def _kill_cgroup(self, path: str, grace_s: float) -> Survivors:
        """Kill an attempt's cgroup whole (TERM, KILL after grace_s) and remove it; what is
        left in it (none once it is empty), as (pid, start ticks)."""
        try:
            report = await anyio.to_thread.run_sync(lambda: cgroups.kill(path, grace_s))
        except OSError as exc:
            # Never stops the rest of a kill (the agent's, the TreeKilled that follows).
            log.error("attempt_cgroup_kill_failed", cgroup=path, error=str(exc))
            return ()
        for killed in report.signalled:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(killed, os.WNOHANG)
        if report.signalled or not report.removed:
            (log.info if report.removed else log.error)(
                "attempt_cgroup_killed",
                cgroup=path,
                pids=list(report.signalled),
                survivors=list(report.survivors),
                cgroup_kill=report.cgroup_killed,
                removed=report.removed,
            )
        return tuple(
            ident
            for ident in (proctree.process_identity(pid) for pid in report.survivors)
            if ident is not None
        )

    async def _stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for worker_id in list(self._agents):
                tg.start_soon(
                    partial(self.stop, worker_id, self._kill_grace_s, kill=self._may_kill)
                )


def _live_child(agent: _Agent | None) -> psutil.Process | None:
    """The agent's process for `children_of`, while it is alive (a zombie's children are
    already re-parented)."""
    if agent is None or agent.process.returncode is not None:
        return None
    try:
        return psutil.Process(agent.process.pid)
    except psutil.Error:
        return None


async def _hang_up(agent: _Agent) -> None:
    """Close the agent's stdin and read its stdout to the end, discarding it."""
    stdin, stdout = agent.process.stdin, agent.process.stdout
    with contextlib.suppress(
        anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError
    ):
        if stdin is not None:
            await stdin.aclose()
        while stdout is not None:
            await stdout.receive()


async def _close(agent: _Agent) -> None:
    # Closes the pipes of an exited agent (its asyncio transport warns if left open).
    with anyio.CancelScope(shield=True):
        await agent.process.aclose()


def daemon_id(state_dir: str | os.PathLike[str]) -> str:
    """This daemon's name on the hosts of its remote agents: its host name and state
    directory hashed, so two daemons whose agents share a remote host and user (the same
    state path on two build hosts, or two daemons on one) never share a spool, and one's
    sweep never kills the other's attempts."""
    real = os.path.realpath(state_dir)
    digest = hashlib.sha256(f"{socket.gethostname()}:{real}".encode()).hexdigest()[:16]
    return f"orchd-{digest}"


def remote_argv(transport: list[str], host: str) -> list[str]:
    """A host's transport argv with `{host}` put in (the agent's command line follows).
    GNU env takes `--` only before its NAME=VALUE words, so a trailing `--` of an `env`
    transport (`env ORCHD_FAKE_HOST={host} --`, for tests) is left out."""
    argv = [arg.replace("{host}", host) for arg in transport]
    if argv and os.path.basename(argv[0]) == "env" and argv[-1] == "--":
        argv.pop()
    return argv


def _line(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()[:STDERR_LINE_MAX]


def _append(path: str, data: bytes) -> None:
    try:
        f = open(path, "ab")  # noqa: SIM115 - closed below
    except FileNotFoundError:  # the task's first attempt: its workstream's log directory
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "ab")  # noqa: SIM115
    with f:
        f.write(data)


def agent_env(environ: dict[str, str]) -> dict[str, str]:
    """The agents' environment: the daemon's minus NOTIFY_SOCKET/WATCHDOG_*/LISTEN_*, with
    this package importable; the agent hands its tasks the original PYTHONPATH back."""
    env = proctree.inheritable_env(environ)
    original = env.get("PYTHONPATH", "")
    env[ORIGINAL_PYTHONPATH_ENV] = original
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, original) if p)
    return env
