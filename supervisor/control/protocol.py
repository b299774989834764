"""Control-socket messages, shared by the daemon and orchctl (framing, limits and error
codes are in frames.py, re-exported here). Pure: no I/O.

A frame is a 4-byte big-endian length followed by a JSON body. A request is
`{id, method, params}`; a response is `{id, ok, result}` or `{id, ok: false, error:
{code, message}}`. Each method has one typed params Struct that refuses unknown fields.

A workstream file bigger than a frame is uploaded on one connection: `upload_begin`
(its size), `upload_chunk` (n times) (at most UPLOAD_CHUNK bytes each, base64 in the JSON),
then `submit` with `upload: true`. The upload belongs to its connection (SESSION_METHODS
are answered by the server itself) and is dropped with it.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

# Re-exported: the framing, limits and error codes are protocol too.
from supervisor.control.frames import EXIT_CODES as EXIT_CODES
from supervisor.control.frames import HEADER as _LEN
from supervisor.control.frames import MAX_REQUEST as MAX_REQUEST
from supervisor.control.frames import MAX_RESPONSE as MAX_RESPONSE
from supervisor.control.frames import UPLOAD_CHUNK as UPLOAD_CHUNK
from supervisor.control.frames import ErrorCode as ErrorCode
from supervisor.control.frames import ProtocolError as ProtocolError
from supervisor.control.frames import drain_words as drain_words
from supervisor.control.frames import frame_length as frame_length


class _Params(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    pass


# --- read-only methods -----------------------------------------------------------------


class StatusParams(_Params):
    pass


class SettleParams(_Params):
    """`settle`: no fields; answered once everything recorded before it is durable."""


class ShowParams(_Params):
    task_id: str
    logs: bool = False
    lines: int = 50
    # Which workstream a bare task id is looked up in (a full name WS/TASK needs none).
    workstream: str | None = None


class TasksParams(_Params):
    workstream: str | None = None
    state: str | None = None


class WorkersParams(_Params):
    pass


class EventsParams(_Params):
    severity: str | None = None
    limit: int = 100
    follow: bool = False


class WsListParams(_Params):
    # Only the runs of this pipeline (the files' `name`), newest first.
    name: str | None = None


class WsFollowParams(_Params):
    """Streams a workstream's task transitions until it is finished (`submit --wait`)."""

    workstream: str
    # Send first the changes after this seq (the submission's) that the daemon still
    # holds in memory, so that a fast task's first moves are not missed.
    after_seq: int | None = None


class WsShowParams(_Params):
    workstream: str


class WsShowArchivedParams(_Params):
    """A retired workstream as its archive holds it (read off the loop)."""

    workstream: str


class WsListArchivedParams(_Params):
    """The archives in archive/ (read off the loop)."""


class LogsArchivedParams(_Params):
    """An archived task log: `task_id` is WS/TASK, WS the retired workstream's id."""

    task_id: str
    lines: int = 100


class WorkerCheckParams(_Params):
    worker_id: str


class WorkerLogsParams(_Params):
    worker_id: str
    lines: int = 100


class ResourcesParams(_Params):
    pass


class LogsParams(_Params):
    task_id: str
    lines: int = 100
    follow: bool = False
    # Which workstream a bare task id is looked up in (a full name WS/TASK needs none).
    workstream: str | None = None


class DepsParams(_Params):
    task_id: str
    # Which workstream a bare task id is looked up in (a full name WS/TASK needs none).
    workstream: str | None = None


class WsCheckpointsParams(_Params):
    workstream: str


class WsAnalyzeParams(_Params):
    workstream: str


class InterventionsParams(_Params):
    limit: int = 20


class MetricsParams(_Params):
    pass


class DebugParams(_Params):
    task_id: str
    lines: int = 20
    # Which workstream a bare task id is looked up in (a full name WS/TASK needs none).
    workstream: str | None = None


class StateValidateParams(_Params):
    pass


class StateBackupsParams(_Params):
    pass


# --- changing methods ------------------------------------------------------------------


class _Previewable(_Params, kw_only=True):
    """A request that can throw work away: with `dry_run` the daemon answers with what it
    would do (control/preview.py) and records nothing; with `expect` (the `digest` of a
    plan the operator confirmed) it is done only if it still does exactly that."""

    dry_run: bool = False
    expect: str | None = None


class SubmitParams(_Params):
    text: str = ""
    source: str | None = None
    # The file is this connection's completed upload, not `text`.
    upload: bool = False
    # The workstream's id, over the file's `id` (refused when it exists).
    id: str | None = None


class PreparedSubmit(SubmitParams):
    """A submit as the server hands it to the engine: `document` is `text` decoded off
    the engine's loop. Never decoded from the wire (it is in no table)."""

    document: dict[str, Any] | None = None


class UploadBeginParams(_Params):
    size: int  # bytes the upload will carry, in all


class UploadChunkParams(_Params):
    data: bytes  # base64 in the JSON


class RetryParams(_Params):
    task_id: str
    timeout_s: float | None = None
    max_retries: int | None = None
    reason: str | None = None
    # Which workstream a bare task id is looked up in (a full name WS/TASK needs none).
    workstream: str | None = None


class SkipParams(_Previewable):
    task_id: str
    reason: str
    # Which workstream a bare task id is looked up in (a full name WS/TASK needs none).
    workstream: str | None = None


class CancelParams(_Previewable):
    task_id: str
    reason: str | None = None
    # Which workstream a bare task id is looked up in (a full name WS/TASK needs none).
    workstream: str | None = None


class WorkerRestartParams(_Params):
    worker_id: str
    reason: str | None = None


class WorkerShutdownParams(_Previewable):
    worker_id: str
    force: bool = False
    reassign: bool = False
    reason: str | None = None


class ResourceSetLimitParams(_Params):
    resource_id: str
    max_holders: int
    reason: str | None = None


class DepRemoveParams(_Params):
    from_task: str
    to_task: str
    reason: str | None = None
    # Which workstream a bare task id is looked up in (a full name WS/TASK needs none).
    workstream: str | None = None


class WsRetryParams(_Previewable):
    workstream: str
    reason: str | None = None


class WsRetryFailedParams(_Params):
    workstream: str
    reason: str | None = None


class WsResumeParams(_Previewable):
    workstream: str
    from_task: str
    reason: str | None = None


class WsRollbackParams(_Previewable):
    workstream: str
    to_checkpoint: str = "latest"
    reason: str | None = None


class WsMarkMergedParams(_Params):
    workstream: str
    reason: str | None = None


class WsRetireParams(_Params):
    workstream: str
    reason: str | None = None


class RevalidateParams(_Params):
    task_id: str
    reason: str | None = None
    # Which workstream a bare task id is looked up in (a full name WS/TASK needs none).
    workstream: str | None = None


class WsPauseParams(_Params):
    workstream: str
    reason: str | None = None


class WsUnpauseParams(_Params):
    workstream: str
    reason: str | None = None


class DrainParams(_Params):
    reason: str | None = None


class UndrainParams(_Params):
    reason: str | None = None


# Reads answered only once every change recorded before them is durable and its effects
# are carried out (events written, agents told), not at the end of their step as other
# reads are: a barrier for a script that reads files the daemon writes after a change.
DURABLE_READS: Final = frozenset({"settle"})

# The explicit dispatch table: method name -> (params type, changes state?).
METHODS: Final[dict[str, tuple[type[_Params], bool]]] = {
    "status": (StatusParams, False),
    "settle": (SettleParams, False),
    "show": (ShowParams, False),
    "tasks": (TasksParams, False),
    "workers": (WorkersParams, False),
    "events": (EventsParams, False),
    "ws_list": (WsListParams, False),
    "ws_show": (WsShowParams, False),
    "ws_follow": (WsFollowParams, False),
    "worker_check": (WorkerCheckParams, False),
    "worker_logs": (WorkerLogsParams, False),
    "resources": (ResourcesParams, False),
    "logs": (LogsParams, False),
    "deps": (DepsParams, False),
    "ws_checkpoints": (WsCheckpointsParams, False),
    "ws_analyze": (WsAnalyzeParams, False),
    "interventions": (InterventionsParams, False),
    "metrics": (MetricsParams, False),
    "debug": (DebugParams, False),
    "state_validate": (StateValidateParams, False),
    "state_backups": (StateBackupsParams, False),
    "ws_show_archived": (WsShowArchivedParams, False),
    "ws_list_archived": (WsListArchivedParams, False),
    "logs_archived": (LogsArchivedParams, False),
    "submit": (SubmitParams, True),
    "retry": (RetryParams, True),
    "skip": (SkipParams, True),
    "cancel": (CancelParams, True),
    "worker_restart": (WorkerRestartParams, True),
    "worker_shutdown": (WorkerShutdownParams, True),
    "resource_set_limit": (ResourceSetLimitParams, True),
    "dep_remove": (DepRemoveParams, True),
    "ws_retry": (WsRetryParams, True),
    "ws_retry_failed": (WsRetryFailedParams, True),
    "ws_resume": (WsResumeParams, True),
    "ws_rollback": (WsRollbackParams, True),
    "ws_mark_merged": (WsMarkMergedParams, True),
    "ws_retire": (WsRetireParams, True),
    "revalidate": (RevalidateParams, True),
    "ws_pause": (WsPauseParams, True),
    "ws_unpause": (WsUnpauseParams, True),
    "drain": (DrainParams, True),
    "undrain": (UndrainParams, True),
}

# Answered by the server for its connection, never by the engine: an upload's parts.
SESSION_METHODS: Final[dict[str, tuple[type[_Params], bool]]] = {
    "upload_begin": (UploadBeginParams, True),
    "upload_chunk": (UploadChunkParams, True),
}

Params = _Params


class Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: int
    method: str
    params: msgspec.Raw = msgspec.Raw(b"{}")


class ErrorBody(msgspec.Struct, kw_only=True):
    code: str
    message: str


class Response(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: int
    ok: bool
    result: Any = None
    error: ErrorBody | None = None


_request_decoder = msgspec.json.Decoder(Request)
_encoder = msgspec.json.Encoder()


def decode_request(body: bytes) -> tuple[Request, _Params, bool]:
    """Decode a request body into its envelope, typed params and whether it changes state."""
    try:
        req = _request_decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ProtocolError("invalid", f"malformed request: {exc}") from None
    entry = METHODS.get(req.method) or SESSION_METHODS.get(req.method)
    if entry is None:
        raise ProtocolError("invalid", f"unknown method {req.method!r}", req.id)
    ptype, changes = entry
    try:
        params = msgspec.json.decode(req.params, type=ptype)
    except msgspec.DecodeError as exc:
        raise ProtocolError("invalid", f"bad params for {req.method}: {exc}", req.id) from None
    return req, params, changes


def encode_request(request_id: int, method: str, params: dict[str, Any]) -> bytes:
    body = _encoder.encode({"id": request_id, "method": method, "params": params})
    return _LEN.pack(len(body)) + body


def encode_response(resp: Response) -> bytes:
    body = _encoder.encode(resp)
    return _LEN.pack(len(body)) + body


def error_response(request_id: int, code: str, message: str) -> Response:
    return Response(id=request_id, ok=False, error=ErrorBody(code=code, message=message))


response_decoder: Final = msgspec.json.Decoder(Response)
