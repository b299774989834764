"""The transitions log as a chain of segment files: their names, the chain's check, the
scan over several of them, and compaction (deleting the segments nothing needs).

`transitions.jsonl` is the active segment, the only one appended to. When it grows past
`store.segment_bytes` it is sealed: renamed to `segments/<first>-<last>.jsonl` (both seqs
zero-padded to 20 digits, so names sort in log order) and a new empty active one is
made. Every file's records are known from its name alone: a sealed one holds first..last,
and the active one starts after the newest sealed one (at 1 when there is none). A state
directory written before segments existed is simply a chain of one (the active file),
so it opens unchanged.

Compaction never deletes the newest sealed segment: it anchors the active file's first
seq, and it costs at most one segment of disk.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from supervisor import failpoints
from supervisor.core.errors import StoreCorrupt
from supervisor.core.model import Transition
from supervisor.store.files import LOG_NAME, cut_torn_tail, utc_stamp
from supervisor.store.logfile import (
    SEGMENTS_DIR,
    Scanner,
    ScanResult,
    corrupt_hint,
    fsync_dir,
    prefix_matches,
    sealed_name,
)

__all__ = ["LOG_NAME", "SEGMENTS_DIR"]
_SEALED = re.compile(r"^(\d{20})-(\d{20})\.jsonl$")


class Segment(msgspec.Struct, frozen=True):
    """One file of the log: the records first..last (last None: the active file)."""

    path: Path
    first: int
    last: int | None = None

    @property
    def name(self) -> str:
        """The path as the state directory names it (`segments/…` or `transitions.jsonl`)."""
        return self.path.name if self.last is None else f"{SEGMENTS_DIR}/{self.path.name}"


def sealed_segments(state_dir: Path) -> list[Segment]:
    """The sealed segments, in log order (nothing is read but the directory)."""
    seg_dir = state_dir / SEGMENTS_DIR
    try:
        names = os.listdir(seg_dir)
    except FileNotFoundError:
        return []
    out = []
    for n in sorted(names):
        if m := _SEALED.match(n):
            out.append(Segment(seg_dir / n, int(m[1]), int(m[2])))
    return out


def log_chain(state_dir: Path) -> list[Segment]:
    """Every file of the log in order: the sealed segments, then the active file if it
    exists. Raises StoreCorrupt when the names leave a hole (a segment is missing)."""
    sealed = sealed_segments(state_dir)
    for a, b in itertools.pairwise(sealed):
        assert a.last is not None
        if b.first != a.last + 1:
            raise StoreCorrupt(
                f"{state_dir / SEGMENTS_DIR}: records {a.last + 1}-{b.first - 1} are missing "
                f"(no segment between {a.path.name} and {b.path.name}); "
                f"{corrupt_hint(state_dir)}",
                path=str(b.path),
            )
    chain = list(sealed)
    active = state_dir / LOG_NAME
    if active.exists():
        chain.append(Segment(active, active_first(sealed)))
    return chain


def active_first(sealed: Sequence[Segment]) -> int:
    """The first seq the active file holds: the one after the newest sealed segment."""
    if not sealed:
        return 1
    last = sealed[-1].last
    assert last is not None
    return last + 1


class LogScan(msgspec.Struct):
    """What a scan over the chain found.

    `scan` is about `tail`, the last file whose records are good: where appending goes on
    (its end, CRC and torn tail). `orphans` are the files after a sealed segment that ends
    early (a power loss took the end of its last records before they were durable): none
    of their records was ever acknowledged, since a sync covers the older file first."""

    scan: ScanResult
    tail: Segment | None
    orphans: list[Segment]
    oldest: int  # the first seq the kept log holds

    @property
    def last_seq(self) -> int:
        return self.scan.last_seq


def scan_chain(
    state_dir: Path,
    chain: Sequence[Segment],
    *,
    seq: int = 0,
    apply_after: int = 0,
    apply: Callable[[Transition], None] | None = None,
    position: tuple[int, int, int] | None = None,
    covered: Callable[[], bool] | None = None,
) -> LogScan:
    """Check (and replay, after `apply_after`) the records after `seq` in `chain`; the
    files before the one holding record seq + 1 are not opened.

    `position` = (first seq of a file, offset, CRC of the bytes before it) is where record
    `seq` ends, as a snapshot records it: when that file still starts with exactly those
    bytes (one CRC pass, no line decoded), the scan starts there; otherwise the file is
    checked from its start, records up to `seq` only checked. `covered`, when given, is
    that CRC check already started (see `start_of`). Raises StoreCorrupt."""
    if not chain:
        # No log at all: it ends at record 0, whatever a snapshot says (the caller refuses
        # a snapshot beyond the log).
        empty = ScanResult(end=0, crc=0, last_seq=0, line=0, size=0)
        return LogScan(scan=empty, tail=None, orphans=[], oldest=1)
    oldest = chain[0].first
    if seq + 1 < oldest:
        raise StoreCorrupt(
            f"{chain[0].path}: the log starts at record {oldest}, but the state it would "
            f"replay onto ends at record {seq}: records {seq + 1}-{oldest - 1} are gone; "
            f"{corrupt_hint(state_dir)}",
            path=str(chain[0].path),
        )
    # The file holding record seq + 1 (the active one holds everything after the sealed).
    i = _holding(chain, seq + 1)
    if i is None:
        # Sealed segments only (a crash between sealing and the new active file), every
        # record covered: nothing to read. The caller makes a new active file.
        seg = chain[-1]
        assert seg.last is not None
        size = os.path.getsize(seg.path)
        done = ScanResult(end=size, crc=0, last_seq=seg.last, line=0, size=size)
        return LogScan(scan=done, tail=seg, orphans=[], oldest=oldest)
    got: ScanResult | None = None
    for k in range(i, len(chain)):
        seg = chain[k]
        scanner = Scanner(seg.path, state_dir)
        if (
            k == i
            and position is not None
            and position[0] == seg.first
            and (covered() if covered else prefix_matches(seg.path, *position[1:], seq))
        ):
            got = scanner.scan(
                start=position[1],
                crc=position[2],
                seq=seq,
                line=seq - seg.first + 1,
                apply_after=apply_after,
                apply=apply,
            )
        else:
            # The scanner checks that the file's first record is the one its name says.
            got = scanner.scan(seq=seg.first - 1, apply_after=max(apply_after, seq), apply=apply)
        if seg.last is not None and got.last_seq > seg.last:
            raise StoreCorrupt(
                f"{seg.path}: holds records up to {got.last_seq}, beyond the {seg.last} its "
                f"name says; {corrupt_hint(state_dir)}",
                path=str(seg.path),
            )
        ends_early = seg.last is not None and got.last_seq < seg.last
        if (got.torn_line is not None or ends_early) and k < len(chain) - 1:
            return LogScan(scan=got, tail=seg, orphans=list(chain[k + 1 :]), oldest=oldest)
    assert got is not None
    return LogScan(scan=got, tail=chain[-1], orphans=[], oldest=oldest)


def _holding(chain: Sequence[Segment], seq: int) -> int | None:
    return next((k for k, s in enumerate(chain) if s.last is None or s.last >= seq), None)


def start_of(chain: Sequence[Segment], seq: int) -> Segment | None:
    """The file a scan of the records after `seq` starts in (None: they are all covered)."""
    i = _holding(chain, seq + 1)
    return None if i is None else chain[i]


def settle(state_dir: Path, found: LogScan, *, fsync: bool, dry_run: bool = False) -> list[str]:
    """Make the chain end in a whole active file, as `found` (a scan) says it should:
    the files after a segment that ends early are kept aside (`<name>.broken.<time>`,
    never deleted), a torn tail is kept aside and cut, and a sealed segment left last
    (a crash between sealing and making the new active file) gets the name of what it
    really holds. Returns what was done (with `dry_run`: what would be done)."""
    done: list[str] = []
    stamp = utc_stamp()
    for seg in found.orphans:
        aside = state_dir / f"{seg.path.name}.broken.{stamp}"
        done.append(
            f"{seg.name} follows records that were never durable (none of it was "
            f"acknowledged); {'it is kept' if dry_run else 'kept'} aside as {aside.name}"
        )
        if not dry_run:
            os.replace(seg.path, aside)
    tail = found.tail
    scan = found.scan
    if tail is not None and scan.torn_line is not None:
        what = (
            f"cut the torn tail of {tail.name} at line {scan.torn_line} "
            f"(a torn write: {scan.torn_why})"
        )
        if dry_run:
            done.append(f"{what}; the torn bytes after record {scan.last_seq} are kept aside")
        else:
            done.append(f"{what}; " + cut_torn_tail(state_dir, scan, fsync=fsync, path=tail.path))
    if tail is not None and tail.last is not None and tail.last != scan.last_seq:
        real = tail.path.with_name(sealed_name(tail.first, scan.last_seq))
        done.append(f"{tail.name} holds records up to {scan.last_seq}: renamed {real.name}")
        if not dry_run:
            os.replace(tail.path, real)
    if not dry_run and done and fsync:
        fsync_dir(state_dir)
        if (state_dir / SEGMENTS_DIR).is_dir():
            fsync_dir(state_dir / SEGMENTS_DIR)
    return done


def compact(state_dir: Path, upto: int) -> list[str]:
    """Delete, oldest first, the sealed segments whose records all are <= `upto`, but
    never the newest sealed one. Returns the names deleted. Each unlink leaves a valid
    chain (a shorter one), so a crash between two of them loses nothing."""
    sealed = sealed_segments(state_dir)
    gone = []
    for seg in sealed[:-1]:
        assert seg.last is not None
        if seg.last > upto:
            break
        failpoints.crash_point("compact_unlink")
        seg.path.unlink(missing_ok=True)
        gone.append(seg.name)
    if gone:
        failpoints.crash_point("compact_done")
    return gone
