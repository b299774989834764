"""The archive files of retired workstreams (supervisor/store/archive.py) on a real
directory: what an archive holds, writing it again carries over what the disk lost, an
earlier run under the same id keeps its own archive, the files dropped and the leftovers
of a crash found."""

from __future__ import annotations

from pathlib import Path

import msgspec

from supervisor.store import archive


def doc(ws_id: str, submitted_at: float, tasks: int = 2) -> bytes:
    return msgspec.json.encode(
        {
            "format": 1,
            "archived_at": 100.0,
            "last_seq": 7,
            "workstream": {"id": ws_id, "state": "completed", "submitted_at": submitted_at},
            "tasks": [{"id": f"{ws_id}/t{i}", "name": f"t{i}"} for i in range(tasks)],
        }
    )


def files_of(state_dir: Path, ws_id: str, text: str) -> None:
    (state_dir / "logs" / ws_id).mkdir(parents=True)
    (state_dir / "checkpoints").mkdir(exist_ok=True)
    (state_dir / "logs" / ws_id / "t0.log").write_text(f"{text}\n")
    (state_dir / "checkpoints" / f"{ws_id}_5.json").write_text("{}")
    (state_dir / "checkpoints" / f"{ws_id}_latest.json").write_text("{}")
    # Another workstream's files are not this one's.
    (state_dir / "checkpoints" / f"{ws_id}x_5.json").write_text("{}")


def test_an_archive_holds_the_summary_document_checkpoints_and_logs(tmp_path: Path) -> None:
    """The summary comes first; the document, both checkpoints and the task log are in."""
    files_of(tmp_path, "ws-a", "hello")
    path = archive.write_archive(tmp_path, "ws-a", doc("ws-a", 1.0))
    assert path == tmp_path / "archive" / "ws-a.tar.gz"
    assert archive.archived_files(tmp_path, "ws-a") == [
        "summary.json",
        "workstream.json",
        "checkpoints/ws-a_5.json",
        "checkpoints/ws-a_latest.json",
        "logs/t0.log",
    ]
    assert archive.read_document(tmp_path, "ws-a")["workstream"]["id"] == "ws-a"
    assert archive.read_log(tmp_path, "ws-a", "t0", 10) == ["hello"]
    assert archive.read_log(tmp_path, "ws-a", "t1", 10) is None
    (listed,) = archive.list_archived(tmp_path)
    assert (listed["id"], listed["state"], listed["tasks"]) == ("ws-a", "completed", 2)
    assert not list((tmp_path / "archive").glob("*.tmp"))


def test_writing_again_carries_over_what_the_disk_no_longer_has(tmp_path: Path) -> None:
    """The same run archived again after its files were deleted keeps its logs."""
    files_of(tmp_path, "ws-a", "hello")
    archive.write_archive(tmp_path, "ws-a", doc("ws-a", 1.0))
    assert archive.drop_files(tmp_path, "ws-a") == 3
    assert not (tmp_path / "logs" / "ws-a").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ws-ax_5.json"]
    archive.write_archive(tmp_path, "ws-a", doc("ws-a", 1.0))
    assert archive.read_log(tmp_path, "ws-a", "t0", 10) == ["hello"]
    assert "checkpoints/ws-a_5.json" in archive.archived_files(tmp_path, "ws-a")


def test_an_earlier_run_under_the_same_id_keeps_its_own_archive(tmp_path: Path) -> None:
    """A new run with a reused id does not take the old run's logs, and the old run's
    archive stays, under a name of its own."""
    files_of(tmp_path, "ws-a", "first run")
    archive.write_archive(tmp_path, "ws-a", doc("ws-a", 1.0))
    archive.drop_files(tmp_path, "ws-a")
    archive.write_archive(tmp_path, "ws-a", doc("ws-a", 2.0))
    assert archive.read_log(tmp_path, "ws-a", "t0", 10) is None
    ids = [a["id"] for a in archive.list_archived(tmp_path)]
    assert len(ids) == 2 and "ws-a" in ids
    (older,) = [i for i in ids if i != "ws-a"]
    assert older.startswith("ws-a.1970-01-01T00-00-01")
    assert archive.read_log(tmp_path, older, "t0", 10) == ["first run"]


def test_leftovers_are_the_files_of_archived_workstreams_no_longer_live(tmp_path: Path) -> None:
    """Files of a workstream with an archive that is not live are leftovers (a crash
    between the retirement record and the deletion); a live one's are not."""
    files_of(tmp_path, "ws-a", "a")
    files_of(tmp_path, "ws-b", "b")
    archive.write_archive(tmp_path, "ws-a", doc("ws-a", 1.0))
    archive.write_archive(tmp_path, "ws-b", doc("ws-b", 1.0))
    assert archive.leftovers(tmp_path, {"ws-b"}) == ["ws-a"]
    assert archive.drop_leftovers(tmp_path, {"ws-b"}) == ["ws-a"]
    assert archive.leftovers(tmp_path, {"ws-b"}) == []
    assert (tmp_path / "logs" / "ws-b" / "t0.log").exists()
