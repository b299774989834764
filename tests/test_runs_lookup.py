"""Workstream runs in the decision core (tests/rig.py, no processes): run numbers per
pipeline name kept in the state, full task names, and how a task or workstream named on
the command line is found (full name, bare id among live runs, --workstream, pipeline
name), including tasks recorded before full names existed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from supervisor.control import actions
from supervisor.control import protocol as p
from supervisor.control.lookup import get_task, get_ws
from supervisor.core.errors import OperatorError
from supervisor.core.machine import Machine
from supervisor.core.model import equal_states
from supervisor.store.directory import Store
from tests.rig import Rig, config

PIPELINE = """name = "nightly"
[[tasks]]
id = "compile"
command = "make"
[[tasks]]
id = "package"
command = "tar"
depends_on = ["compile"]
"""


def submit(rig: Rig, text: str = PIPELINE, **params: Any) -> dict[str, Any]:
    out = rig.run(actions.submit, p.SubmitParams(text=text, **params))
    if isinstance(out, Exception):
        raise out
    assert isinstance(out, dict)
    return out


def finish_all(rig: Rig) -> None:
    """Every attempt the pool runs succeeds, until nothing runs any more."""
    for _ in range(100):
        if not rig.pool.current:
            return
        for wid in list(rig.pool.current):
            rig.pool.finish(wid)
        rig.deliver()
    raise AssertionError("tasks kept running")


def resolve(rig: Rig, ref: str, workstream: str | None = None) -> str:
    out = rig.run(lambda m: get_task(m, ref, workstream).id)
    if isinstance(out, Exception):
        raise out
    assert isinstance(out, str)
    return out


def refusal(rig: Rig, ref: str, workstream: str | None = None) -> OperatorError:
    with pytest.raises(OperatorError) as err:
        resolve(rig, ref, workstream)
    return err.value


def test_runs_of_a_pipeline_are_numbered_and_tasks_get_full_names() -> None:
    """Each submission of a named file is NAME-N; its tasks are WS/TASK, dependencies
    rewritten to the same run's tasks; the counter is in the state and replays."""
    rig = Rig(config(workers=1))
    ids = [submit(rig)["workstream_id"] for _ in range(3)]
    assert ids == ["nightly-1", "nightly-2", "nightly-3"]
    data = rig.state.data
    assert data.run_numbers == {"nightly": 3}
    assert data.tasks["nightly-2/package"].depends_on == ["nightly-2/compile"]
    assert data.tasks["nightly-2/package"].name == "package"
    assert [w.number for w in data.workstreams.values()] == [1, 2, 3]
    assert equal_states(rig.store.replay().data, data)


def test_run_numbers_are_not_reused_when_the_runs_are_gone() -> None:
    """The counter, not the runs that exist, decides the next number."""
    rig = Rig(config(workers=1))
    # As a state loaded from a snapshot whose runs are gone, counter kept.
    rig.state.data.run_numbers["nightly"] = 41
    assert submit(rig)["workstream_id"] == "nightly-42"


def test_explicit_id_that_exists_is_wrong_state_with_the_way_out() -> None:
    """An existing id (file or --id) is refused as wrong_state (exit 5), nothing
    recorded, and the message says to drop `id` or pass --id."""
    rig = Rig(config(workers=1))
    submit(rig, 'id = "rel"\n' + PIPELINE)
    seq = rig.state.last_seq
    for params in ({}, {"id": "rel"}):
        with pytest.raises(OperatorError) as err:
            submit(rig, 'id = "rel"\n' + PIPELINE, **params)
        assert err.value.code == "wrong_state" and "--id" in str(err.value)
    assert rig.state.last_seq == seq
    assert submit(rig, 'id = "rel"\n' + PIPELINE, id="rel-2")["workstream_id"] == "rel-2"


def test_bare_id_names_the_one_live_run() -> None:
    """With one live run having the id, a bare id is that run's task, however many
    finished runs have it too."""
    rig = Rig(config(workers=1))
    submit(rig)
    submit(rig)
    finish_all(rig)
    submit(rig)  # nightly-3 is live; 1 and 2 completed
    assert rig.state.data.workstreams["nightly-1"].state == "completed"
    assert resolve(rig, "compile") == "nightly-3/compile"
    assert resolve(rig, "nightly-1/compile") == "nightly-1/compile"


def test_bare_id_in_several_finished_runs_is_ambiguous_newest_first() -> None:
    """No live run and several finished ones: refused (invalid: exit 2) with the full
    names, the most recent first."""
    rig = Rig(config(workers=1))
    for _ in range(3):
        submit(rig)
    finish_all(rig)
    err = refusal(rig, "compile")
    assert err.code == "invalid" and "ambiguous" in str(err)
    msg = str(err)
    places = [msg.index(f"nightly-{n}/compile") for n in (3, 2, 1)]
    assert places == sorted(places), msg
    assert "--workstream" in msg


def test_bare_id_in_two_live_runs_is_ambiguous() -> None:
    """Two live runs: only the live ones are listed."""
    rig = Rig(config(workers=1))
    submit(rig)
    finish_all(rig)
    submit(rig)
    submit(rig)
    msg = str(refusal(rig, "package"))
    assert "nightly-3/package" in msg and "nightly-2/package" in msg
    assert "nightly-1/package" not in msg


def test_bare_id_of_one_finished_run_is_that_run() -> None:
    """The recovery guide's case: one run, failed or completed, and its bare task id."""
    rig = Rig(config(workers=1))
    submit(rig)
    finish_all(rig)
    assert resolve(rig, "compile") == "nightly-1/compile"


def test_workstream_option_and_pipeline_names() -> None:
    """--workstream takes a run id or a pipeline name (its newest run); a full name's WS
    part may be a pipeline name too; ws commands take a pipeline name."""
    rig = Rig(config(workers=1))
    submit(rig)
    submit(rig)
    assert resolve(rig, "compile", "nightly-1") == "nightly-1/compile"
    assert resolve(rig, "compile", "nightly") == "nightly-2/compile"
    assert resolve(rig, "nightly/compile") == "nightly-2/compile"
    assert rig.run(lambda m: get_ws(m, "nightly").id) == "nightly-2"
    shown = rig.run(actions.ws_show, p.WsShowParams(workstream="nightly"))
    assert shown["id"] == "nightly-2"
    err = refusal(rig, "lint", "nightly-1")
    assert err.code == "not_found" and "nightly-1" in str(err)
    assert refusal(rig, "nightly-9/compile").code == "not_found"


def test_ws_list_by_name_is_newest_first() -> None:
    """ws_list with a name lists that pipeline's runs, newest first, with name and number."""
    rig = Rig(config(workers=1))
    submit(rig)
    submit(rig, PIPELINE.replace("nightly", "release"))
    submit(rig)
    runs = rig.run(actions.ws_list, p.WsListParams(name="nightly"))
    assert [(r["id"], r["name"], r["number"]) for r in runs] == [
        ("nightly-2", "nightly", 2),
        ("nightly-1", "nightly", 1),
    ]


def test_dep_remove_takes_the_bare_id_of_a_dependency() -> None:
    """`dep remove --from package --to compile` in a run: both bare ids resolve."""
    rig = Rig(config(workers=1))
    rig.m.rt.set_draining()  # nothing runs: package stays pending on compile
    submit(rig)
    params = p.DepRemoveParams(from_task="package", to_task="compile")
    out = rig.run(actions.HANDLERS["dep_remove"], params)
    assert out["removed"] == "nightly-1/compile" and out["depends_on"] == []


def legacy(m: Machine) -> None:
    """A creation record as written before full names: bare task ids."""
    m.commit(
        "workstream",
        "ws-old",
        "pending",
        "submit",
        workstream={"id": "ws-old"},
        tasks=[
            {"id": "old", "workstream_id": "ws-old", "command": "x"},
            {"id": "later", "workstream_id": "ws-old", "command": "y", "depends_on": ["old"]},
        ],
    )


def test_tasks_recorded_before_full_names_still_work() -> None:
    """Bare ids in old records are their own full names: they resolve, run, replay, and
    a new run may depend on one by that id."""
    rig = Rig(config(workers=1))
    rig.run(legacy)
    assert resolve(rig, "old") == "old" and rig.task("old").name == "old"
    finish_all(rig)
    assert rig.state.data.workstreams["ws-old"].state == "completed"
    out = submit(
        rig,
        '[[tasks]]\nid = "old"\ncommand = "z"\n'
        '[[tasks]]\nid = "new"\ncommand = "z"\ndepends_on = ["later"]\n',
    )
    ws = out["workstream_id"]
    assert rig.state.data.tasks[f"{ws}/new"].depends_on == ["later"]
    assert resolve(rig, "old") == f"{ws}/old"  # the live run's
    assert equal_states(rig.store.replay().data, rig.state.data)


def test_task_log_paths_are_per_workstream(tmp_path: Path) -> None:
    """logs/WS/TASK.log for a full name, logs/TASK.log for a bare (older) id; nothing
    else gets out of logs/."""
    store = Store(tmp_path, fsync=False)
    assert store.task_log_path("nightly-3/compile") == tmp_path / "logs/nightly-3/compile.log"
    assert store.task_log_path("old") == tmp_path / "logs/old.log"
    for bad in ("../x", "a/../b", "/x", "a/.b"):
        with pytest.raises(ValueError):
            store.task_log_path(bad)
