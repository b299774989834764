"""The control socket: framing, peer credentials, access checks, dispatch to the engine.

Errors become error responses here and nowhere else: a malformed, oversized or unknown
request gets a clear `{code, message}` and never disturbs the daemon.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import structlog
from anyio.abc import SocketStream

from supervisor.control import protocol as p
from supervisor.control import streams
from supervisor.control.access import Access, Peer, peer_of
from supervisor.control.actions import HANDLERS
from supervisor.control.admission import Admission, RefusalLog
from supervisor.control.preview import confirmed, rehearsal
from supervisor.control.queries import finish
from supervisor.control.state_actions import OFF_LOOP
from supervisor.control.upload import Upload, Uploads
from supervisor.core.config import ControlConfig
from supervisor.core.errors import OperatorError, OrchdError, StoreError, WorkstreamFileError
from supervisor.core.submission import decode_document
from supervisor.engine.loop import Engine

log = structlog.get_logger("orchd.server")
# How many queries read their files at once (each in a worker thread).
QUERY_READERS = 2


class SocketInUse(OrchdError):
    """Raised at start when another process already listens on the control socket's path."""


class Connection:
    """What one connection holds between its requests: an upload in progress."""

    __slots__ = ("upload",)

    def __init__(self) -> None:
        self.upload: Upload | None = None


class Server:
    def __init__(self, path: str, engine: Engine, cfg: ControlConfig) -> None:
        self.path, self.engine, self.cfg = path, engine, cfg
        self.access = Access(cfg)
        self.admission = Admission()
        self.refusals = RefusalLog()
        self.uploads = Uploads()
        self._file_readers: anyio.CapacityLimiter | None = None
        self._query_readers: anyio.CapacityLimiter | None = None

    def _access(self) -> Access:
        """The access lists in force: a config reload replaces the engine's settings."""
        if (live := self.engine.cfg.control) is not self.cfg:
            self.cfg, self.access = live, Access(live)
        return self.access

    def _prepare_path(self) -> None:
        d = Path(self.path).parent
        if not d.exists():
            # Ours to make: not world-searchable, so only owner and group reach the socket.
            d.mkdir(mode=0o750, parents=True)
        elif stat.S_IMODE(d.stat().st_mode) & 0o001:
            # Not ours to change (it may be /tmp); the socket itself is still 0660.
            log.warning("socket_directory_world_searchable", directory=str(d))
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)  # nobody listens: a leftover of an earlier run
            else:
                raise SocketInUse(
                    f"another process listens on {self.path}; give this daemon another "
                    "socket_path (or stop the other one)"
                )
            finally:
                probe.close()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        self._prepare_path()
        old = os.umask(0o117)  # the socket is created 0660
        try:
            listener = await anyio.create_unix_listener(self.path)
        finally:
            os.umask(old)
        log.info("control_socket_listening", path=self.path)
        async with listener:
            task_status.started()
            await listener.serve(self._serve)

    async def _serve(self, stream: SocketStream) -> None:
        async with stream:
            conn = Connection()
            try:
                peer = peer_of(stream)
                access = self._access()
                # A peer with no rights at all is turned away before it takes a slot.
                if not access.allows(peer, changes=False):
                    await self._refuse(
                        stream,
                        peer,
                        "permission_denied",
                        f"uid {peer.uid} may not use this socket (control.users/groups, "
                        "read_users/read_groups or admin_users/admin_groups in the config)",
                    )
                    return
                why = self.admission.enter(peer.uid, access.privileged(peer), self.cfg)
                if why is not None:
                    await self._refuse(stream, peer, "unavailable", why)
                    return
                try:
                    await self._session(stream, peer, conn)
                finally:
                    self.admission.leave(peer.uid)
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                ConnectionError,
            ):
                pass
            except TimeoutError:
                # A request begun and not finished in time: this connection ends, and never
                # the listener (an escaping error would close the socket to everyone).
                with contextlib.suppress(anyio.BrokenResourceError, ConnectionError):
                    await stream.send(
                        p.encode_response(
                            p.error_response(
                                0,
                                "invalid",
                                "the request was not complete within "
                                f"{self.cfg.request_timeout_s}s (control.request_timeout_s)",
                            )
                        )
                    )
            except Exception:  # a bug must not take the socket from everyone else
                log.exception("control_connection_failed")
            finally:
                self._drop_upload(conn, "connection_closed")

    async def _refuse(self, stream: SocketStream, peer: Peer, code: str, message: str) -> None:
        """Send the refusal as an error frame and log it (rate-limited: a flood of
        connections makes one line every few seconds, with the count left out)."""
        reason = "no_rights" if code == "permission_denied" else "too_many_connections"
        suppressed = self.refusals.should_log(reason, peer.uid, time.monotonic())
        if suppressed is not None:
            log.warning(
                "control_connection_refused",
                reason=reason,
                uid=peer.uid,
                pid=peer.pid,
                open=self.admission.total,
                open_by_uid=self.admission.by_uid[peer.uid],
                suppressed=suppressed,
            )
        await stream.send(p.encode_response(p.error_response(0, code, message)))

    async def _read_exact(self, stream: SocketStream, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            buf += await stream.receive(n - len(buf))
        return bytes(buf)

    async def _session(self, stream: SocketStream, peer: Peer, conn: Connection) -> None:
        while True:
            with anyio.move_on_after(self.cfg.idle_timeout_s) as idle:
                header = await self._read_exact(stream, 4)
            if idle.cancelled_caught:
                return
            try:
                n = p.frame_length(header, p.MAX_REQUEST)
            except p.ProtocolError as exc:
                await stream.send(p.encode_response(p.error_response(0, exc.code, exc.message)))
                return  # the body would be unread garbage: close the connection
            with anyio.fail_after(self.cfg.request_timeout_s):
                body = await self._read_exact(stream, n)
            streaming = await self._request(stream, peer, body, conn)
            if streaming:
                return

    async def _request(
        self, stream: SocketStream, peer: Peer, body: bytes, conn: Connection
    ) -> bool:
        try:
            req, params, changes = p.decode_request(body)
        except p.ProtocolError as exc:
            await stream.send(
                p.encode_response(p.error_response(exc.request_id, exc.code, exc.message))
            )
            return False
        if not self._access().allows(peer, changes):
            kind = "change state" if changes else "read state"
            await stream.send(
                p.encode_response(
                    p.error_response(
                        req.id,
                        "permission_denied",
                        f"uid {peer.uid} may not {kind} (control.users/groups in the config)",
                    )
                )
            )
            return False
        if isinstance(params, p.EventsParams) and params.follow:
            await streams.follow_events(self.engine, stream, req.id, params)
            return True
        if isinstance(params, p.LogsParams) and params.follow:
            await streams.follow_log(self.engine, stream, req.id, params, self._readers())
            return True
        if isinstance(params, p.WsFollowParams):
            await streams.follow_ws(self.engine, stream, req.id, params)
            return True
        big = False
        if req.method in p.SESSION_METHODS:
            resp = self._upload_part(req, params, conn)
        else:
            resp, big = await self._dispatch(req, params, changes, peer, conn)
        if big:  # an answer read from files may be megabytes: encoded off the loop too
            await stream.send(await anyio.to_thread.run_sync(p.encode_response, resp))
        else:
            await stream.send(p.encode_response(resp))
        return False

    # -- an upload: its parts, then the submit that takes it ----------------------------

    def _upload_part(self, req: p.Request, params: p.Params, conn: Connection) -> p.Response:
        """upload_begin or upload_chunk: answered here, for this connection alone."""
        try:
            if isinstance(params, p.UploadBeginParams):
                self._drop_upload(conn, "replaced")
                conn.upload = Upload(params.size, self._access_cfg().max_submit_bytes)
                self.uploads.add(conn.upload)
                log.info("upload_begun", size=params.size)
            else:
                assert isinstance(params, p.UploadChunkParams)
                if conn.upload is None:
                    raise OperatorError(
                        "invalid", "no upload on this connection: send upload_begin first"
                    )
                try:
                    conn.upload.add(params.data)
                except OperatorError:
                    self._drop_upload(conn, "overflow")
                    raise
        except OperatorError as exc:
            return p.error_response(req.id, exc.code, str(exc))
        up = conn.upload
        assert up is not None
        return p.Response(id=req.id, ok=True, result={"received": up.received, "size": up.size})

    def _drop_upload(self, conn: Connection, why: str) -> None:
        up, conn.upload = conn.upload, None
        if up is not None:
            self.uploads.discard(up)
            if why != "taken":
                log.info("upload_dropped", why=why, received=up.received, size=up.size)

    def _access_cfg(self) -> ControlConfig:
        self._access()
        return self.cfg

    async def _prepared(self, params: p.SubmitParams, conn: Connection) -> p.PreparedSubmit:
        """The file of a submit (inline, or this connection's upload), decoded off the
        engine's loop: a big file's TOML takes about a second per 20,000 tasks, and the
        loop keeps stepping meanwhile. A file that is not TOML is refused here, whole."""
        if params.upload:
            up = conn.upload
            if up is None:
                raise OperatorError(
                    "invalid", "no upload on this connection: send upload_begin and the chunks"
                )
            try:
                data = up.take()
            finally:
                self._drop_upload(conn, "taken")
        else:
            data = params.text.encode()
        source = params.source or "<submitted>"
        try:
            text, doc = await anyio.to_thread.run_sync(_decode_file, data, source)
        except WorkstreamFileError as exc:
            raise OperatorError("invalid", str(exc)) from None
        return p.PreparedSubmit(text=text, source=params.source, id=params.id, document=doc)

    async def _dispatch(
        self, req: p.Request, params: p.Params, changes: bool, peer: Peer, conn: Connection
    ) -> tuple[p.Response, bool]:
        """The response, and whether its result was read from files (a query's FilePart,
        read in a worker thread once the step has answered: control/queries.py)."""
        logged: Any = None
        big = False
        dry_run = getattr(params, "dry_run", False)
        expect = getattr(params, "expect", None)
        try:
            if isinstance(params, p.SubmitParams):
                # The interventions log names the file, not its (maybe megabytes of) text.
                logged = {"source": params.source, "upload": params.upload, "id": params.id}
                params = await self._prepared(params, conn)
                logged["bytes"] = len(params.text.encode())
            if req.method in OFF_LOOP:
                result = await self._off_loop(req.method, params)
            else:
                handler = HANDLERS[req.method]
                if dry_run:
                    handler = rehearsal(handler)
                elif expect is not None:
                    handler = confirmed(handler, expect)
                if isinstance(params, p.WsRetireParams) and not dry_run:
                    result = await self._retire(handler, params)
                else:
                    # A query (nothing changed) is answered without waiting for a slow
                    # sync, unless it is a barrier (p.DURABLE_READS).
                    query = not changes and req.method not in p.DURABLE_READS
                    result = await self.engine.call(handler, params, query=query)
                    result, big = await finish(result, self._readers())
            if req.method == "status":
                result["uploads"] = self.uploads.figures()
            resp = p.Response(id=req.id, ok=True, result=result)
        except OperatorError as exc:
            resp = p.error_response(req.id, exc.code, str(exc))
        except StoreError as exc:
            resp = p.error_response(
                req.id, "unavailable", f"{exc} — state is unchanged; fix the disk and retry"
            )
        except Exception as exc:  # a bug must not kill the daemon; the caller gets a message
            log.exception("request_failed", method=req.method)
            resp = p.error_response(req.id, "failed", f"internal error in {req.method}: {exc}")
        if changes and not dry_run:
            log.info("control_change", method=req.method, uid=peer.uid, pid=peer.pid, ok=resp.ok)
            entry = {
                "ts": round(self.engine.wall(), 3),
                "method": req.method,
                "uid": peer.uid,
                "pid": peer.pid,
                "params": logged if logged is not None else msgspec.to_builtins(params),
                "ok": resp.ok,
                "result": resp.result if resp.ok else msgspec.to_builtins(resp.error),
            }
            try:
                self.engine.record_intervention(entry)
            except OSError as exc:  # a full disk: the journal keeps the line instead
                log.error("intervention_not_written", error=str(exc), entry=entry)
        return resp, big

    def _readers(self) -> anyio.CapacityLimiter:
        """The worker threads that read files for queries (a few at a time: they share
        the two cores with the loop)."""
        if self._query_readers is None:
            self._query_readers = anyio.CapacityLimiter(QUERY_READERS)
        return self._query_readers

    async def _retire(self, handler: Any, params: p.WsRetireParams) -> dict[str, Any]:
        """`ws retire`: the archive is asked for in a step, written in a thread, then the
        retirement is recorded in another step; the answer waits for that record."""
        recv = self.engine.follow_records()  # before the call: no record falls between
        async with recv:
            result: dict[str, Any] = await self.engine.call(handler, params)
            ws_id = result["workstream_id"]
            async for records in recv:
                for rec in records:
                    if rec.entity != "workstream" or rec.id != ws_id:
                        continue
                    if rec.to == "retired":
                        return {
                            "workstream_id": ws_id,
                            "state": "retired",
                            "archive": rec.changes.get("archive"),
                            "seq": rec.seq,
                        }
                    raise OperatorError(
                        "wrong_state",
                        f"workstream {ws_id} changed while it was archived (now {rec.to}); "
                        "it was not retired",
                    )
        raise OperatorError(
            "unavailable", f"lost track of workstream {ws_id}'s retirement: see `orchctl events`"
        )

    async def _off_loop(self, method: str, params: p.Params) -> Any:
        """A request that reads the state directory's files: in a worker thread, one at a
        time, so the engine's loop goes on meanwhile."""
        state_dir = self.engine.store.state_dir.absolute()
        fn = OFF_LOOP[method]
        if self._file_readers is None:
            self._file_readers = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(
            fn, state_dir, params, limiter=self._file_readers, abandon_on_cancel=True
        )


def _decode_file(data: bytes, source: str) -> tuple[str, dict[str, Any]]:
    """A submitted file's text and its TOML document (run in a worker thread)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WorkstreamFileError([f"{source}: not UTF-8 text: {exc}"]) from None
    return text, decode_document(data, source)
