"""The daemon's side of the workers: spawn agents, carry their messages, kill them. I/O edge.

Each agent is `python -m supervisor.workers.agent` in its own session, with frames on its stdin
and stdout and its stderr appended to `logs/workers/<id>.log`. Every process the pool
starts gets a generation number, and every message it reads is delivered to the inbox
tagged with it, so the engine can tell a replaced process's late words from the current
one's. The pool decides nothing: it reports, and it does what it is told.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
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
from supervisor.core.effects import OldAgent, TaskTree
from supervisor.core.inputs import AgentExited, AgentMessage
from supervisor.workers import cgroup as cgroups
from supervisor.workers import proctree
from supervisor.workers.launch import ORIGINAL_PYTHONPATH_ENV

log = structlog.get_logger("orchd.pool")

# A send to an agent that does not read (stopped, wedged) must not stall the engine.
SEND_TIMEOUT_S = 5.0
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
    ) -> None:
        self._python = python
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
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None
                with anyio.CancelScope(shield=True):
                    await self._stop_all()

    async def spawn(self, worker_id: str) -> int:
        """Start an agent for `worker_id` (replacing any previous one); its generation.
        Raises OSError when the process cannot be started."""
        if self._tg is None:
            raise RuntimeError("Pool.run is not running")
        generation = next(self._generations)
        log_path = self._log_dir / "workers" / f"{worker_id}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            self._python,
            "-m",
            "supervisor.workers.agent",
            "--worker-id",
            worker_id,
            "--heartbeat-s",
            repr(self._heartbeat_s),
            "--kill-grace-s",
            repr(self._kill_grace_s),
            "--log",
            str(log_path),
        ]
        if failpoints.take("spawn_fail"):
            raise OSError(errno.EAGAIN, "spawn refused by the spawn_fail failpoint")
        with open(log_path, "ab") as stderr:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=self._env,
                start_new_session=True,
            )
        agent = _Agent(worker_id, generation, process)
        previous = self._agents.get(worker_id)
        if previous is not None and previous.process.returncode is None:
            log.warning("agent_replaced_while_alive", worker_id=worker_id, pid=previous.process.pid)
        self._agents[worker_id] = agent
        log.info("agent_spawned", worker_id=worker_id, generation=generation, pid=process.pid)
        self._tg.start_soon(self._watch, agent)
        return generation

    async def send(self, worker_id: str, msg: wire.ToAgent) -> bool:
        """Send one message to the worker's current agent; False if it is gone or not reading."""
        agent = self._agents.get(worker_id)
        if agent is None or agent.process.returncode is not None:
            return False
        stdin = agent.process.stdin
        assert stdin is not None
        try:
            async with agent.lock:
                with anyio.fail_after(SEND_TIMEOUT_S):
                    await stdin.send(wire.frame(msg))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, TimeoutError):
            log.warning("agent_send_failed", worker_id=worker_id, message=type(msg).__name__)
            return False
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
                if a.worker_id in live and a.attempt_id not in markers:
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

    async def stop(self, worker_id: str, grace_s: float, *, kill: bool = True) -> None:
        """Ask the agent to stop (it kills its attempt first); kill it if it is not gone
        within grace_s and a little more (only when `kill`: a record says why)."""
        agent = self._agents.get(worker_id)
        if agent is None or agent.process.returncode is not None:
            return
        if await self.send(worker_id, wire.Stop(grace_s=grace_s)):
            with anyio.move_on_after(grace_s + 2.0):
                await agent.process.wait()
        if agent.process.returncode is None:
            log.warning("agent_stop_timeout", worker_id=worker_id, pid=agent.process.pid, kill=kill)
            if kill:
                await self._kill_agent(agent, 0.0)
        await _close(agent)

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
        await _close(agent)
        if self._agents.get(agent.worker_id) is agent:
            del self._agents[agent.worker_id]
        log.info("agent_exited", worker_id=agent.worker_id, returncode=returncode)
        if inbox_open:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await self._inbox.send(AgentExited(agent.worker_id, agent.generation, returncode))

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


def agent_env(environ: dict[str, str]) -> dict[str, str]:
    """The agents' environment: the daemon's minus NOTIFY_SOCKET/WATCHDOG_*/LISTEN_*, with
    this package importable; the agent hands its tasks the original PYTHONPATH back."""
    env = proctree.inheritable_env(environ)
    original = env.get("PYTHONPATH", "")
    env[ORIGINAL_PYTHONPATH_ENV] = original
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, original) if p)
    return env
