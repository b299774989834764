"""A cgroup (v2) per attempt: the subtree the daemon owns, each attempt's cgroup made,
entered, killed whole, accounted and removed. I/O edge: the cgroup file system.

Where the daemon's cgroups live (`Hierarchy.open`):
- under systemd with `Delegate=yes`, the unit's own cgroup (systemd marks it delegated
  with a `trusted.delegate` / `user.delegate` extended attribute, and a non-root service
  owns it);
- as root on a writable unified hierarchy (not a systemd unit's cgroup),
  `orchd-<hash of the state directory>` made under the daemon's current cgroup. One
  daemon owns a state directory at a time (its lock), so the name is unique among live
  daemons, and one found at start is a dead daemon's leftover: killed and removed.

Either way the layout is that of a container manager, because of cgroup v2's "no internal
processes" rule (a cgroup that hands controllers to its children may hold no process):

    <base>/daemon/               the daemon and its agents (a leaf)
    <base>/attempts/<attempt_id> one leaf per attempt, controllers (memory) where available

How an attempt's process starts inside its cgroup: Python offers neither clone3 with
CLONE_INTO_CGROUP nor glibc's posix_spawnattr_setcgroup_np (2.39; Debian 12 has 2.36), and
a preexec_fn would give up the agent's vfork spawn and is unsafe with threads. So the agent
moves itself into the attempt's cgroup, spawns (a child is born in its parent's cgroup, so
there is no moment at which it is outside), and moves itself back (`inside`). That is two
migrations (about 0.1 ms each here) instead of an extra exec of a helper (about 10 ms).
What the agent allocates during those microseconds is charged to the attempt; so the
memory limit is written only after the spawn, or a tiny limit could OOM-kill the agent.

A kill (`kill`) is SIGTERM to every process of the cgroup (through a pidfd, after checking
that the pid is still in the cgroup: never a reused pid), `grace_s` to leave, then
`cgroup.kill`, confirmed by `cgroup.events` saying `populated 0` (waited for with poll(),
which the kernel wakes on every change of that file), then `rmdir`. It needs nothing from
the agent, and no process can leave the cgroup by forking, setsid or a cleared
environment. (A task running as the daemon's user could move itself out by writing to
cgroup.procs; that takes intent, not accident, and the marker sweep of the process mode
has the same limit.)

All functions here block; async callers run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec

DAEMON_LEAF = "daemon"
ATTEMPTS = "attempts"
# Where a dead daemon's processes found in the daemon leaf (its agents) are moved at
# start, to be killed once recovery has recorded why.
STALE_LEAF = "stale"
# Controllers handed to the attempts' cgroups when the hierarchy offers them: memory gives
# memory.peak and memory.max. CPU time (cpu.stat usage_usec) needs no controller.
WANTED_CONTROLLERS = ("memory",)
# After cgroup.kill, how long until the kernel must have emptied the cgroup.
KILL_WAIT_S = 5.0
_POLL_CAP_S = 0.1
_UNIT_SUFFIXES = (".service", ".scope")


class Unavailable(Exception):
    """Raised by `Hierarchy.open` when no cgroup can be made here; the message says why
    and what would change it."""


class CgroupKill(msgspec.Struct, frozen=True, kw_only=True):
    """What `kill` did: the pids it signalled, any left (none once `empty`), whether
    `cgroup.kill` was needed and whether the cgroup is removed."""

    path: str
    signalled: tuple[int, ...] = ()
    survivors: tuple[int, ...] = ()
    cgroup_killed: bool = False
    empty: bool = True
    removed: bool = False
    # The cgroup's accounting, read once it was empty and before it was removed.
    cpu_s: float | None = None
    memory_peak_bytes: int | None = None


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """An attempt's accounting, read from its cgroup before it is removed."""

    cpu_s: float | None = None
    memory_peak_bytes: int | None = None


class Hierarchy(msgspec.Struct, kw_only=True):
    """The daemon's cgroup subtree (see the module docstring)."""

    base: str
    # Where the daemon was before it moved into <base>/daemon (it goes back there at close).
    home: str
    made_base: bool
    controllers: tuple[str, ...] = ()
    # Cgroups a previous life left: its attempts' (recovery kills those recorded as
    # running, gracefully, within one grace) and the leaf its agents were moved to;
    # `clear_stale` kills and removes what is left of them.
    stale: tuple[str, ...] = ()

    @property
    def attempts(self) -> str:
        """The directory of the attempts' cgroups."""
        return os.path.join(self.base, ATTEMPTS)

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> Hierarchy:
        """Find or make the daemon's subtree, clean what a dead daemon left in it, move this
        process into its daemon leaf and enable what controllers there are. Raises
        Unavailable (saying why) when the host gives the daemon no cgroup of its own."""
        mount = mount_point()
        if mount is None:
            raise Unavailable("no cgroup v2 hierarchy is mounted (see /proc/self/mountinfo)")
        home = own_cgroup(mount)
        if home is None:
            raise Unavailable("this process is in no cgroup v2 (no 0:: line in /proc/self/cgroup)")
        if _delegated(home):
            base, made = home, False
        elif home.rstrip("/").endswith(_UNIT_SUFFIXES):
            raise Unavailable(
                f"the cgroup {home} belongs to systemd and is not delegated to orchd "
                "(add Delegate=yes to the unit)"
            )
        else:
            base, made = os.path.join(home, base_name(state_dir)), True
        fresh = False
        try:
            if made:
                # One that exists is a dead daemon's (this one holds the state directory's
                # lock): it is taken over.
                with contextlib.suppress(FileExistsError):
                    os.mkdir(base)
                    fresh = True
            if not os.path.exists(os.path.join(base, "cgroup.kill")):
                raise Unavailable(f"{base} has no cgroup.kill (it needs Linux 5.14 or later)")
            # What a previous life left is killed only after recovery has recorded why
            # (the write-ahead rule): its attempts by recovery itself, gracefully and all
            # at once; its agents, moved out of the daemon leaf now, by `clear_stale`.
            attempts = os.path.join(base, ATTEMPTS)
            stale = [os.path.join(attempts, name) for name in _children(attempts)]
            leaf = os.path.join(base, DAEMON_LEAF)
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf)
            gone_to = os.path.join(base, STALE_LEAF)
            if _evict(leaf, gone_to) or os.path.isdir(gone_to):
                stale.append(gone_to)
            _move(os.getpid(), leaf)
            with contextlib.suppress(FileExistsError):
                os.mkdir(os.path.join(base, ATTEMPTS))
        except (OSError, Unavailable) as exc:
            if fresh:  # only what was made just now: nothing of a previous life is signalled
                with contextlib.suppress(OSError):
                    _move(os.getpid(), home)
                    _kill_and_remove(base)
            if isinstance(exc, Unavailable):
                raise
            raise Unavailable(
                f"cannot make cgroups under {home}: {exc.strerror or exc} (run orchd as root on a "
                "host with a writable cgroup v2 hierarchy, or under systemd with Delegate=yes)"
            ) from None
        controllers = _enable(base, WANTED_CONTROLLERS)
        controllers = _enable(os.path.join(base, ATTEMPTS), controllers)
        return cls(
            base=base,
            home=home,
            made_base=made,
            controllers=controllers,
            stale=tuple(stale),
        )

    def attempt_path(self, attempt_id: str) -> str:
        """The cgroup of an attempt. Attempt ids are `<task>.<n>.<hex>` of [A-Za-z0-9._-]:
        a valid directory name that never equals an interface file's."""
        return os.path.join(self.attempts, attempt_id)

    def clear_stale(self) -> list[CgroupKill]:
        """Kill and remove what is left of the previous life's cgroups, once recovery has
        recorded it: reports for those that were still there."""
        return [kill(path, 0.0) for path in self.stale if os.path.isdir(path)]

    def close(self, grace_s: float = 0.0) -> list[CgroupKill]:
        """Kill and remove every attempt cgroup still there, move this process back to
        where it was and remove what the daemon made; the attempt cgroups that were left."""
        paths = [os.path.join(self.attempts, name) for name in _children(self.attempts)]
        killed = [kill(path, grace_s) for path in paths]
        with contextlib.suppress(OSError):
            _disable(self.attempts, self.controllers)
            os.rmdir(self.attempts)
        with contextlib.suppress(OSError):
            if not self.made_base:
                # Back into the delegated cgroup itself, which must then hand out nothing.
                _disable(self.base, self.controllers)
            _move(os.getpid(), self.home)
            os.rmdir(os.path.join(self.base, DAEMON_LEAF))
            if self.made_base:
                os.rmdir(self.base)
        return killed


def base_name(state_dir: str | os.PathLike[str]) -> str:
    """`orchd-<12 hex>` for a state directory (its real path), the name of the cgroup a
    root daemon makes for it."""
    real = os.path.realpath(state_dir)
    return "orchd-" + hashlib.sha256(real.encode()).hexdigest()[:12]


def mount_point() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup on a unified host,
    /sys/fs/cgroup/unified on a hybrid one), or None."""
    global _mount
    if _mount is None:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(maxsplit=1)[:1] != ["cgroup2"]:
                    continue
                fields = left.split()
                where = _unescape(fields[4])
                major, minor = (int(x) for x in fields[2].split(":"))
                # A mount listed but covered by a later one (a container's fresh /sys over
                # the host's) is not the one to use: only a visible mount has its device.
                with contextlib.suppress(OSError):
                    if os.stat(where).st_dev == os.makedev(major, minor):
                        _mount = where
    return _mount


_mount: str | None = None


def own_cgroup(mount: str | None = None, pid: int | str = "self") -> str | None:
    """The directory of a process's cgroup v2 (this one's by default), or None."""
    mount = mount or mount_point()
    if mount is None:
        return None
    try:
        with open(f"/proc/{pid}/cgroup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):
                    rel = line[3:].strip().removesuffix(" (deleted)")
                    return os.path.normpath(os.path.join(mount, rel.lstrip("/")))
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


# --- one attempt's cgroup ----------------------------------------------------------------


def create(path: str) -> None:
    """Make an attempt's cgroup (a leftover of the same name is killed first)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        kill(path, 0.0)
        os.mkdir(path)


def set_memory_max(path: str, memory_mb: int | None) -> bool:
    """`memory.max` of the cgroup (None: no limit); False when the memory controller is
    not enabled there."""
    target = os.path.join(path, "memory.max")
    if not os.path.exists(target):
        return False
    _write(target, "max" if memory_mb is None else str(memory_mb * 1024 * 1024))
    return True


def has_controller(path: str, name: str) -> bool:
    """Whether the controller is enabled for the cgroup (listed in its cgroup.controllers)."""
    try:
        return name in Path(path, "cgroup.controllers").read_text().split()
    except OSError:
        return False


@contextlib.contextmanager
def inside(path: str, home: str) -> Iterator[None]:
    """Run the block with this process in cgroup `path`, then back in `home`: whatever
    it forks is born in `path`. Raises OSError when the cgroup cannot be entered."""
    me = os.getpid()
    _move(me, path)
    try:
        yield
    finally:
        _move(me, home)


def procs(path: str) -> list[int]:
    """The pids in the cgroup and its descendants (empty when it does not exist)."""
    out: list[int] = []
    for dirpath, _, _ in os.walk(path):
        try:
            with open(os.path.join(dirpath, "cgroup.procs"), encoding="ascii") as f:
                out += [int(x) for x in f.read().split()]
        except OSError as exc:
            if not _vanished(exc):
                raise
    return out


def populated(path: str) -> bool:
    """Whether any process is left in the cgroup or below it (False once it is gone)."""
    try:
        return _events_populated(Path(path, "cgroup.events").read_bytes())
    except OSError as exc:
        if _vanished(exc):
            return False
        raise


def wait_empty(path: str, timeout_s: float) -> bool:
    """Wait until `cgroup.events` says `populated 0` (or the cgroup is gone), at most
    `timeout_s`; True when it is empty."""
    deadline = time.monotonic() + timeout_s
    try:
        fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while True:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                data = os.read(fd, 4096)
            except OSError as exc:
                # Removed meanwhile (by the agent, while the daemon kills it too): an open
                # file of a removed cgroup answers ENODEV.
                if _vanished(exc):
                    return True
                raise
            if not _events_populated(data):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # The kernel wakes poll() on every change of the file; the cap only guards
            # against a missed wake-up.
            poller.poll(min(left, _POLL_CAP_S) * 1000)
    finally:
        os.close(fd)


def kill(path: str, grace_s: float, *, remove: bool = True) -> CgroupKill:
    """SIGTERM (and SIGCONT) to every process of the cgroup, `grace_s` for them to go,
    then cgroup.kill and a wait for `populated 0`; its accounting is read and, with
    `remove`, the cgroup (and any below it) removed. Blocks for up to grace_s + KILL_WAIT_S."""
    if not os.path.isdir(path):
        return CgroupKill(path=path, removed=True)
    signalled: list[int] = []
    for pid in procs(path):
        if _signal_member(pid, path, signal.SIGTERM):
            signalled.append(pid)
            # A stopped process would hold a TERM pending forever; let it act on it.
            _signal_member(pid, path, signal.SIGCONT)
    empty = wait_empty(path, grace_s) if signalled and grace_s > 0 else not populated(path)
    cgroup_killed = False
    if not empty:
        signalled += [p for p in procs(path) if p not in signalled]
        try:
            _write(os.path.join(path, "cgroup.kill"), "1")
            cgroup_killed = True
        except OSError as exc:
            if not _vanished(exc):
                raise  # else removed meanwhile: nothing left to kill
        empty = wait_empty(path, KILL_WAIT_S)
    survivors = () if empty else tuple(sorted(procs(path)))
    used = usage(path)
    return CgroupKill(
        path=path,
        signalled=tuple(sorted(set(signalled))),
        survivors=survivors,
        cgroup_killed=cgroup_killed,
        empty=empty,
        removed=remove_tree(path) if remove and empty else False,
        cpu_s=used.cpu_s,
        memory_peak_bytes=used.memory_peak_bytes,
    )


def usage(path: str) -> Usage:
    """CPU time (cpu.stat usage_usec, there without any controller) and peak memory
    (memory.peak, with the memory controller) of the cgroup; None for what is missing."""
    cpu_s: float | None = None
    peak: int | None = None
    try:
        for line in Path(path, "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                cpu_s = int(value) / 1e6
                break
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError, IndexError):
        peak = int(Path(path, "memory.peak").read_text().split()[0])
    return Usage(cpu_s=cpu_s, memory_peak_bytes=peak)


def remove_tree(path: str) -> bool:
    """rmdir the cgroup and any below it (each must be empty); True once it is gone."""
    for dirpath, _, _ in sorted(os.walk(path), key=lambda t: -t[0].count("/")):
        try:
            os.rmdir(dirpath)
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return True


# --- internals ---------------------------------------------------------------------------


def _vanished(exc: OSError) -> bool:
    """The cgroup (or the process) went away under us: not an error for a kill."""
    return exc.errno in (errno.ENOENT, errno.ENODEV, errno.ESRCH)


def _events_populated(data: bytes) -> bool:
    for line in data.splitlines():
        if line.startswith(b"populated "):
            return line.split()[1] != b"0"
    return False


def _signal_member(pid: int, path: str, sig: signal.Signals) -> bool:
    """Signal `pid` only if, once we hold a pidfd for it, it is still in the cgroup `path`
    (or below): the pidfd pins the process, so a pid reused since the listing is never hit."""
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return False
    try:
        where = own_cgroup(pid=pid)
        if where is None or not (where == path or where.startswith(path + "/")):
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except (ProcessLookupError, PermissionError, OSError):
        return False
    finally:
        os.close(pidfd)


def _move(pid: int, path: str) -> None:
    _write(os.path.join(path, "cgroup.procs"), str(pid))


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _children(path: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def _evict(leaf: str, to: str) -> bool:
    """Move every process but this one out of `leaf` into `to` (made if needed); True when
    there was any."""
    me, moved = os.getpid(), False
    for _ in range(10):
        others = [p for p in procs(leaf) if p != me]
        if not others:
            return moved
        with contextlib.suppress(FileExistsError):
            os.mkdir(to)
        for pid in others:
            with contextlib.suppress(ProcessLookupError, OSError):
                _move(pid, to)
                moved = True
    return moved


def _kill_and_remove(path: str) -> None:
    """Kill everything in a subtree at once (one cgroup.kill covers its descendants) and
    remove it."""
    if populated(path):
        with contextlib.suppress(FileNotFoundError):
            _write(os.path.join(path, "cgroup.kill"), "1")
        if not wait_empty(path, KILL_WAIT_S):
            raise OSError(errno.EBUSY, f"processes left in {path} after cgroup.kill")
    if not remove_tree(path):
        raise OSError(errno.EBUSY, f"cannot remove {path}")


def _delegated(path: str) -> bool:
    """systemd marks a cgroup it delegates (Delegate=yes) with an extended attribute;
    a non-root process that owns its cgroup has been given it the same way."""
    for attr in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, attr) == b"1":
                return True
    euid = os.geteuid()
    if euid == 0:
        return False
    try:
        owned = os.stat(path).st_uid == euid
    except OSError:
        return False
    return owned and os.access(os.path.join(path, "cgroup.procs"), os.W_OK)


def _enable(path: str, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """Enable each wanted controller the cgroup offers for its children; those enabled."""
    try:
        offered = Path(path, "cgroup.controllers").read_text().split()
    except OSError:
        return ()
    done: list[str] = []
    for name in wanted:
        if name not in offered:
            continue
        try:
            _write(os.path.join(path, "cgroup.subtree_control"), f"+{name}")
            done.append(name)
        except OSError:
            continue  # e.g. EBUSY: the cgroup still holds a process
    return tuple(done)


def _disable(path: str, controllers: tuple[str, ...]) -> None:
    for name in controllers:
        with contextlib.suppress(OSError):
            _write(os.path.join(path, "cgroup.subtree_control"), f"-{name}")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape") if "\\" in field else field
