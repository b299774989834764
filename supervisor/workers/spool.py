"""The agent's host-local spool: fenced outcomes and streamed output files. I/O edge.

A directory private to the agent's user (default `${XDG_RUNTIME_DIR:-/tmp}/orchd-agent-<uid>`,
mode 0700, refused when someone else owns it). An attempt's shim that fences writes
`<attempt id>.json` there (supervisor.workers.shim). The agent reports its own at once
and leaves them there (its link may be broken); the next agent on the host, after its
sweep, reports every one it is not told is live, and removes it. An attempt with
`stream_output` writes its output to `<attempt id>.out` there, which the
agent tails into Output frames and removes at the attempt's end.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec


class SpoolError(Exception):
    """Raised by `prepare` when the spool directory cannot be used (whose it is, what it is)."""


class Fenced(msgspec.Struct, kw_only=True):
    """A fence recorded by a shim: why, when (epoch seconds), how the command ended."""

    attempt_id: str
    fenced: bool = True
    why: str = ""
    when: float = 0.0
    exit_code: int | None = None
    signal: int | None = None
    survivors: list[tuple[int, int]] = []


def default_dir(environ: dict[str, str] | os._Environ[str], daemon_id: str = "") -> Path:
    """`${XDG_RUNTIME_DIR:-/tmp}/orchd-agent-<uid>`, and in it `<daemon_id>` when given:
    two daemons whose agents share a host and a user never sweep each other's attempts."""
    base = Path(environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"orchd-agent-{os.getuid()}"
    return base / daemon_id if daemon_id else base


def prepare_default(environ: dict[str, str] | os._Environ[str], daemon_id: str = "") -> Path:
    """The default spool made and checked (its parent too, when it is a daemon's own)."""
    if daemon_id:
        prepare(default_dir(environ))
    return prepare(default_dir(environ, daemon_id))


def prepare(path: Path) -> Path:
    """Make the spool (mode 0700) or check the one there: a directory, not a symlink, ours.
    Raises SpoolError saying what is wrong."""
    try:
        if not path.is_symlink() and not path.exists():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        raise SpoolError(f"cannot make the spool directory {path}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SpoolError(f"the spool {path} is not a directory; remove it or pass --spool")
    if st.st_uid != os.getuid():
        raise SpoolError(
            f"the spool {path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}); "
            "pass --spool with a directory of your own"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def one_component(attempt_id: str) -> bool:
    """True when `attempt_id` names a file of the spool and nothing else."""
    return attempt_id not in ("", ".", "..") and "/" not in attempt_id and "\0" not in attempt_id


def fenced_path(spool: Path, attempt_id: str) -> Path:
    return spool / f"{attempt_id}.json"


def output_path(spool: Path, attempt_id: str) -> Path:
    return spool / f"{attempt_id}.out"


_decoder = msgspec.json.Decoder(Fenced)


def read_fenced(path: Path) -> Fenced | None:
    """The fence recorded at `path`, None when there is none or it is unreadable."""
    try:
        return _decoder.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


def all_fenced(spool: Path) -> list[tuple[Path, Fenced]]:
    """Every fence recorded in the spool (oldest first), with its file."""
    found = []
    for path in spool.glob("*.json"):
        rec = read_fenced(path)
        if rec is None:
            # Unreadable (not a shim's): named by its file, so it is still reported once.
            rec = Fenced(attempt_id=path.stem, why="unreadable spool record")
        found.append((path, rec))
    return sorted(found, key=lambda x: x[1].when)
