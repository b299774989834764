"""Who is at the other end of a control connection (its peer credentials, SO_PEERCRED)
and what the control config lets it do: read, change, or use the reserved connections.
I/O edge: the credentials come from the socket, the names from the user and group
databases."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import socket
import struct
from typing import Any

import msgspec
from anyio.abc import SocketAttribute, SocketStream

from supervisor.core.config import ControlConfig

_PEERCRED = struct.Struct("iII")  # pid, uid, gid: ids unsigned


class Peer(msgspec.Struct, frozen=True):
    pid: int
    uid: int
    gid: int
    # Its primary group and the groups that list its user, looked up once as it connects.
    groups: frozenset[int] = frozenset()


def _groups_of(uid: int, gid: int) -> frozenset[int]:
    gids = {gid}
    try:
        name = pwd.getpwuid(uid).pw_name
        gids.update(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)
    except KeyError:
        pass
    return frozenset(gids)


def peer_of(stream: SocketStream) -> Peer:
    sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid=pid, uid=uid, gid=gid, groups=_groups_of(uid, gid))


def _ids(names: list[str], lookup: Any) -> set[int]:
    out: set[int] = set()
    for n in names:
        if n.isdigit():
            out.add(int(n))
        else:
            with contextlib.suppress(KeyError):
                out.add(lookup(n)[2])
    return out


class Access:
    """Who may read and who may change, from the control config."""

    def __init__(self, cfg: ControlConfig) -> None:
        owner = os.getuid()
        # Root, the daemon's own user and the admins may use the reserved connections.
        self.admin_users = _ids(cfg.admin_users, pwd.getpwnam) | {0, owner}
        self.admin_groups = _ids(cfg.admin_groups, grp.getgrnam)
        self.write_users = _ids(cfg.users, pwd.getpwnam) | self.admin_users
        self.write_groups = _ids(cfg.groups, grp.getgrnam) | self.admin_groups
        self.read_users = _ids(cfg.read_users, pwd.getpwnam) | self.write_users
        self.read_groups = _ids(cfg.read_groups, grp.getgrnam) | self.write_groups

    def allows(self, peer: Peer, changes: bool) -> bool:
        users, groups = (
            (self.write_users, self.write_groups)
            if changes
            else (self.read_users, self.read_groups)
        )
        if peer.uid in users:
            return True
        return bool(groups & peer.groups) if groups else False

    def privileged(self, peer: Peer) -> bool:
        """Root, the daemon's user or an admin: the reserved connections are theirs."""
        return peer.uid in self.admin_users or bool(self.admin_groups & peer.groups)
