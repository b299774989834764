"""The few exception types of orchd, each documented by when it is raised."""

from __future__ import annotations


class OrchdError(Exception):
    """Base of every error orchd raises on purpose."""


class IllegalTransition(OrchdError):
    """Raised by `State.apply` when a record's move is not in the transition table, its
    `from` is not the entity's current state, its seq is not the next one, or it names an
    unknown field. Nothing has been changed when it is raised."""

    def __init__(self, entity: str, id_: str, from_: str | None, to: str, why: str) -> None:
        self.entity, self.id, self.from_, self.to, self.why = entity, id_, from_, to, why
        super().__init__(f"illegal {entity} transition {id_}: {from_} -> {to} ({why})")


class ConfigError(OrchdError):
    """Raised when a config file cannot be read, is not TOML, has an unknown key or a value of
    the wrong type or range. The message names the file and the key."""


class WorkstreamFileError(OrchdError):
    """Raised when a submitted workstream is refused; `problems` lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("workstream refused:\n  " + "\n  ".join(problems))


class WorkstreamExists(OrchdError):
    """Raised when a submission gives (in its file or with `--id`) a workstream id that
    already exists; a file without an explicit id never collides."""


class StoreError(OrchdError):
    """Base of the state directory's errors."""


class StoreLocked(StoreError):
    """Raised on open when another process holds the state directory's lock."""


class StoreCorrupt(StoreError):
    """Raised on load when the log cannot be trusted: a bad record followed by good ones,
    a seq gap, or a snapshot newer than the log. The daemon exits 65 on it. The message
    names the file, the line and the `orchctl state ...` command to run."""

    def __init__(self, message: str, *, path: str, line: int | None = None) -> None:
        self.path, self.line = path, line
        super().__init__(message)


class StoreWriteError(StoreError):
    """Raised when an append could not be written (e.g. ENOSPC). The log was cut back to its
    last good record; changes are refused until a write succeeds again."""


class StoreFsyncError(StoreError):
    """Raised when fsync failed. It is never retried: the daemon exits non-zero and
    recovers from the log on restart."""


class OperatorError(OrchdError):
    """Raised by an operator action that cannot be done; `code` is the control protocol's
    error code (not_found, wrong_state, invalid, permission_denied, failed), which orchctl
    maps to its exit code."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)
