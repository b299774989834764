"""orchctl's command line: arguments → one request → output and an exit code (DESIGN.md §6)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ctl import completion, confirm, follow, menu, prometheus, render, statedir
from ctl.client import Client, DaemonUnreachable, RemoteError
from ctl.exitcodes import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from supervisor.control.frames import EXIT_CODES, drain_words

SERVICE_SOCKET = "/run/orchd/orchd.sock"
# How often `drain --wait` asks whether tasks still run.
DRAIN_POLL_S = 0.2


def default_socket() -> str:
    """The socket used without --socket: $ORCHD_SOCKET, else the system service's when it
    exists (and this user may see it), else the one of a daemon run from this directory."""
    if env := os.environ.get("ORCHD_SOCKET"):
        return env
    return SERVICE_SOCKET if os.path.exists(SERVICE_SOCKET) else ".state/orchd.sock"


def _workstream_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--workstream",
        metavar="WS",
        help="the workstream (or pipeline name: its newest run) of a bare task id",
    )


# The global on/off options: (flag, help).
_GLOBAL_FLAGS = (
    ("--json", "machine-readable output on stdout"),
    ("--yes", "do not ask for confirmation"),
)


def _global_options(parser: argparse.ArgumentParser, *, below: bool) -> None:
    """The options every command takes, before or after its name. Below the top level
    their default is SUPPRESS: one not given there leaves the top level's value alone."""
    have = parser._option_string_actions
    if "--socket" not in have:
        parser.add_argument(
            "--socket",
            default=argparse.SUPPRESS if below else default_socket(),
            help=f"control socket (default $ORCHD_SOCKET, else {SERVICE_SOCKET} if it exists, "
            "else .state/orchd.sock)",
        )
    for flag, text in _GLOBAL_FLAGS:
        if flag not in have:
            parser.add_argument(
                flag, action="store_true", default=argparse.SUPPRESS if below else False, help=text
            )


def subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser`, at any depth (each once, aliases or not)."""
    out: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                out += [sub, *subcommand_parsers(sub)]
    return out


def _with_global_options(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every subcommand, however deep and whoever added it, the global options."""
    for sp in subcommand_parsers(ap):
        _global_options(sp, below=True)
    return ap


@contextlib.contextmanager
def _translations_cached() -> Iterator[None]:
    """argparse looks each of its messages up in the gettext catalogues, on disk, once per
    (sub)parser: about 130 lookups, a third of building orchctl's parser. The same message
    translates the same way throughout one short run, so each is looked up once."""
    plain = argparse._  # type: ignore[attr-defined]
    argparse._ = functools.lru_cache(maxsize=None)(plain)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        argparse._ = plain  # type: ignore[attr-defined]


def _parser() -> argparse.ArgumentParser:
    with _translations_cached():
        return _commands()


def _commands() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="orchctl", description="Control the orchd supervisor daemon.")
    _global_options(ap, below=False)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    sub.add_parser("status", help="daemon and state summary")
    sp = sub.add_parser("submit", help="submit a workstream file (TOML): a new run each time")
    sp.add_argument("file", type=Path)
    sp.add_argument("--id", dest="ws_id", metavar="WS", help="the new workstream's id")
    sp.add_argument(
        "--wait",
        action="store_true",
        help="follow the run, a line per task transition; exit 0 completed, 1 failed/cancelled",
    )
    sp = sub.add_parser("tasks", help="list tasks")
    sp.add_argument("--workstream")
    sp.add_argument("--state")
    sp = sub.add_parser("show", help="one task in detail")
    sp.add_argument("task")
    _workstream_option(sp)
    sp.add_argument("--logs", action="store_true", help="include the end of its log")
    sp.add_argument("-n", "--lines", type=int, default=50)
    sp = sub.add_parser("logs", help="a task's log")
    sp.add_argument("task")
    _workstream_option(sp)
    sp.add_argument("-n", "--lines", type=int, default=100)
    sp.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    sp = sub.add_parser("deps", help="a task's dependencies, dependents and why it waits")
    sp.add_argument("task")
    _workstream_option(sp)
    dep = sub.add_parser("dep", help="change dependencies").add_subparsers(
        dest="dep_cmd", required=True, metavar="ACTION"
    )
    sp = dep.add_parser("remove", help="A no longer depends on B")
    sp.add_argument("--from", dest="from_task", required=True, metavar="A")
    sp.add_argument("--to", dest="to_task", required=True, metavar="B")
    _workstream_option(sp)
    sp = sub.add_parser("revalidate", help="re-run only the validation step of a task")
    sp.add_argument("task")
    _workstream_option(sp)
    sp = sub.add_parser("debug", help="diagnose a task; on a terminal, pick a next action")
    sp.add_argument("task")
    _workstream_option(sp)
    sp.add_argument("-n", "--lines", type=int, default=20)
    sp = sub.add_parser("dag", help="a workstream's dependency graph")
    sp.add_argument("workstream")
    sp.add_argument("--format", choices=["text", "dot", "mermaid"], default="text")
    sp = sub.add_parser("interventions", help="the operator actions, newest last")
    sp.add_argument("-n", "--limit", type=int, default=20)
    sp = sub.add_parser("metrics", help="live metrics")
    sp.add_argument("--prometheus", action="store_true", help="Prometheus text format")
    sp = sub.add_parser("completion", help="shell completion script")
    sp.add_argument("shell", choices=sorted(completion.SHELLS))
    sp = sub.add_parser("events", help="events, newest last")
    sp.add_argument("-f", "--follow", action="store_true")
    sp.add_argument("--severity", choices=["debug", "info", "warning", "error", "critical"])
    sp.add_argument("-n", "--limit", type=int, default=100)
    sub.add_parser("workers", help="list workers")
    sp = sub.add_parser("top", help="live view: running, waiting, workers, resources, events")
    sp.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    sp.add_argument("-n", "--count", type=int, default=0, help="stop after N refreshes")
    sub.add_parser("resources", help="resources, holders and waiters")
    sp = sub.add_parser("retry", help="reset a task to pending (fresh retries)")
    sp.add_argument("task")
    _workstream_option(sp)
    sp.add_argument("--timeout", type=float)
    sp.add_argument("--max-retries", type=int)
    sp = sub.add_parser("skip", help="mark a task completed (skipped) — asks to confirm")
    sp.add_argument("task")
    _workstream_option(sp)
    sp.add_argument("--reason", required=True)
    sp = sub.add_parser("cancel", help="cancel a task (kills it if running)")
    sp.add_argument("task")
    _workstream_option(sp)
    ws = sub.add_parser("ws", help="workstreams").add_subparsers(
        dest="ws_cmd", required=True, metavar="ACTION"
    )
    sp = ws.add_parser("list")
    sp.add_argument(
        "--name", help="only the runs of this pipeline (the files' `name`), newest first"
    )
    sp.add_argument(
        "--archived", action="store_true", help="the retired workstreams in archive/ instead"
    )
    for name, text in (
        ("show", "a workstream and its tasks"),
        ("retry", "every task back to pending with fresh retries"),
        ("retry-failed", "the failed tasks back to pending"),
        ("checkpoints", "its checkpoints (seq, time, counts)"),
        ("mark-merged", "a completed workstream becomes merged (final)"),
        ("analyze", "the guide's decision trees, with the commands to run next"),
        ("resume", "a task and everything downstream of it back to pending"),
        ("rollback", "back to a checkpoint (completed tasks stay completed)"),
    ):
        sp = ws.add_parser(name, help=text)
        sp.add_argument("workstream")
        if name == "resume":
            sp.add_argument("--from-task", required=True, metavar="TASK")
        if name == "rollback":
            sp.add_argument("--to-checkpoint", required=True, metavar="latest|N")
        if name == "show":
            sp.add_argument(
                "--archived", action="store_true", help="a retired workstream, from its archive"
            )
    sp = ws.add_parser("retire", help="archive a finished workstream now and drop it from memory")
    sp.add_argument("workstream")
    sp.add_argument("--reason")
    for name, text in (
        ("pause", "start nothing new in it (running tasks finish); undo with unpause"),
        ("unpause", "a paused workstream starts tasks again"),
    ):
        sp = ws.add_parser(name, help=text)
        sp.add_argument("workstream")
        sp.add_argument("--reason")
    sp = sub.add_parser("drain", help="start no new task anywhere (running tasks finish)")
    sp.add_argument("--reason")
    sp.add_argument(
        "--wait", action="store_true", help="return once no task runs any more (then stop it)"
    )
    sp = sub.add_parser("undrain", help="start tasks again after a drain")
    sp.add_argument("--reason")
    wk = sub.add_parser("worker", help="one worker").add_subparsers(
        dest="worker_cmd", required=True, metavar="ACTION"
    )
    for name in ("check", "restart"):
        wk.add_parser(name).add_argument("worker")
    sp = wk.add_parser("logs")
    sp.add_argument("worker")
    sp.add_argument("-n", "--lines", type=int, default=100)
    sp = wk.add_parser("shutdown")
    sp.add_argument("worker")
    sp.add_argument("--force", action="store_true", help="even when it runs a task")
    sp.add_argument(
        "--reassign", action="store_true", help="move its task to another worker (no retry spent)"
    )
    rs = sub.add_parser("resource", help="one resource").add_subparsers(
        dest="res_cmd", required=True, metavar="ACTION"
    )
    sp = rs.add_parser("set-limit")
    sp.add_argument("resource")
    sp.add_argument("max_holders", type=int)
    statedir.add_commands(sub)
    return _with_global_options(ap)


def _colour() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    match args.cmd:
        case "status" | "workers" | "resources":
            return args.cmd, {}
        case "submit":
            return "submit", {
                "text": args.file.read_text(),
                "source": str(args.file),
                "id": args.ws_id,
            }
        case "tasks":
            return "tasks", {"workstream": args.workstream, "state": args.state}
        case "show":
            return "show", {
                "task_id": args.task,
                "logs": args.logs,
                "lines": args.lines,
                "workstream": args.workstream,
            }
        case "logs":
            return "logs", {
                "task_id": args.task,
                "lines": args.lines,
                "follow": args.follow,
                "workstream": args.workstream,
            }
        case "deps" | "revalidate":
            return args.cmd, {"task_id": args.task, "workstream": args.workstream}
        case "debug":
            return "debug", {
                "task_id": args.task,
                "lines": args.lines,
                "workstream": args.workstream,
            }
        case "dep":
            return "dep_remove", {
                "from_task": args.from_task,
                "to_task": args.to_task,
                "workstream": args.workstream,
            }
        case "dag":
            return "ws_show", {"workstream": args.workstream}
        case "interventions":
            return "interventions", {"limit": args.limit}
        case "metrics":
            return "metrics", {}
        case "events":
            return "events", {"severity": args.severity, "limit": args.limit, "follow": args.follow}
        case "retry":
            return "retry", {
                "task_id": args.task,
                "timeout_s": args.timeout,
                "max_retries": args.max_retries,
                "workstream": args.workstream,
            }
        case "skip":
            return "skip", {
                "task_id": args.task,
                "reason": args.reason,
                "workstream": args.workstream,
            }
        case "cancel":
            return "cancel", {"task_id": args.task, "workstream": args.workstream}
        case "ws":
            if args.ws_cmd == "list":
                if args.archived:
                    return "ws_list_archived", {}
                return "ws_list", {"name": args.name}
            if args.ws_cmd == "show" and args.archived:
                return "ws_show_archived", {"workstream": args.workstream}
            params: dict[str, Any] = {"workstream": args.workstream}
            if args.ws_cmd == "resume":
                params["from_task"] = args.from_task
            if args.ws_cmd == "rollback":
                params["to_checkpoint"] = args.to_checkpoint
            if args.ws_cmd in ("pause", "unpause", "retire"):
                params["reason"] = args.reason
            return "ws_" + args.ws_cmd.replace("-", "_"), params
        case "worker":
            if args.worker_cmd == "shutdown":
                return "worker_shutdown", {
                    "worker_id": args.worker,
                    "force": args.force,
                    "reassign": args.reassign,
                }
            if args.worker_cmd == "logs":
                return "worker_logs", {"worker_id": args.worker, "lines": args.lines}
            return f"worker_{args.worker_cmd}", {"worker_id": args.worker}
        case "drain" | "undrain":
            return args.cmd, {"reason": args.reason}
        case "resource":
            return "resource_set_limit", {
                "resource_id": args.resource,
                "max_holders": args.max_holders,
            }
    raise AssertionError(args.cmd)


def _human(method: str, result: Any, colour: bool) -> str:
    match method:
        case "deps":
            return render.deps_view(result, colour)
        case "ws_analyze":
            return render.analysis_view(result)
        case "ws_checkpoints":
            return render.checkpoints_table(result) if result else "no checkpoints"
        case "interventions":
            return render.interventions_lines(result)
        case "debug":
            return render.debug_view(result)
        case "tasks":
            return render.tasks_table(result, colour)
        case "workers":
            return render.workers_table(result, colour)
        case "resources":
            return render.resources_table(result)
        case "events":
            return render.events_lines(result, colour)
        case "show":
            return render.task_detail(result)
        case "worker_check":
            return render.worker_detail(result)
        case "logs" | "worker_logs" | "logs_archived":
            return "\n".join(result["lines"])
        case "ws_list":
            return render.table(
                ["workstream", "name", "state", "dispatch", "tasks", "counts"],
                [
                    (
                        w["id"],
                        w.get("name") or "-",
                        w["state"],
                        "paused" if w.get("paused") else "-",
                        w["tasks"],
                        " ".join(f"{k}={v}" for k, v in w["counts"].items()),
                    )
                    for w in result
                ],
                colour=colour,
                state_col=2,
            )
        case "ws_list_archived":
            return render.table(
                ["workstream", "name", "state", "tasks", "bytes", "archived"],
                [
                    (
                        a["id"],
                        a.get("name") or "-",
                        a.get("state") or "?",
                        a.get("tasks", "?"),
                        a["bytes"],
                        render.local_time(a["archived_at"]),
                    )
                    for a in result
                ],
                colour=colour,
                state_col=2,
            )
        case "ws_show_archived":
            return (
                f"workstream {result['id']}: {result['state']} (retired; archive "
                f"{result['archive']})\n" + render.tasks_table(result["tasks"], colour)
            )
        case "ws_show":
            paused = " (paused: nothing new starts)" if result.get("paused") else ""
            return f"workstream {result['id']}: {result['state']}{paused}\n" + render.tasks_table(
                result["tasks"], colour
            )
        case "ws_pause" | "ws_unpause" | "drain" | "undrain":
            return _hold_words(method, result)
        case "status":
            parts = [
                f"last seq {result['last_seq']}, up {result['uptime_s']:.0f}s"
                + (" (draining)" if result["draining"] else "")
            ]
            for key in ("workstreams", "tasks", "workers"):
                parts.append(
                    f"{key}: "
                    + (", ".join(f"{k} {v}" for k, v in sorted(result[key].items())) or "none")
                )
            if result.get("drain"):
                since = result["drain"].get("reason") or "an operator's drain"
                parts.append(
                    f"{drain_words(result['drain']).upper()}: no task starts until "
                    f"`orchctl undrain` ({since})"
                )
            if result.get("paused_workstreams"):
                parts.append("paused workstreams: " + ", ".join(result["paused_workstreams"]))
            if (c := result.get("containment")) is not None:
                parts.append(render.containment_line(c))
            if result.get("read_only"):
                parts.append(
                    "READ-ONLY: no change is accepted until the state log takes writes again "
                    f"(it retries by itself): {result['read_only']}"
                )
            return "\n".join(parts)
    if isinstance(result, dict) and "seq" in result:
        if result["seq"] is None:
            return "nothing to change: " + ", ".join(
                f"{k}={v}" for k, v in result.items() if k != "seq"
            )
        rest = ", ".join(f"{k}={v}" for k, v in result.items() if k != "seq")
        return f"ok (seq {result['seq']}): {rest}"
    return render.to_json(result)


def _hold_words(method: str, result: dict[str, Any]) -> str:
    """What a pause, unpause, drain or undrain did, in a sentence."""
    seq = result["seq"]
    ws = result.get("workstream")
    if seq is None:
        return {
            "ws_pause": f"workstream {ws} was paused already: nothing to change",
            "ws_unpause": f"workstream {ws} was not paused: nothing to change",
            "drain": f"drained already ({result.get('running')} running): nothing to change",
            "undrain": "the daemon was not drained: nothing to change",
        }[method]
    match method:
        case "ws_pause":
            return (
                f"workstream {ws} paused (seq {seq}); its {result['running']} running task(s) "
                f"finish, nothing new starts until `orchctl ws unpause {ws}`"
            )
        case "ws_unpause":
            return f"workstream {ws} starts tasks again (seq {seq})"
        case "drain":
            n = result["running"]
            held = (
                f"draining (seq {seq}): {n} running task(s) finish"
                if n
                else (f"drained (seq {seq}): nothing running")
            )
            return f"{held}, no task starts until `orchctl undrain`"
    return f"the daemon starts tasks again (seq {seq})"


def _wait_drained(client: Client) -> int:
    """`drain --wait`: poll until no task runs any more."""
    while True:
        drain = client.call("status").get("drain")
        if drain is None:
            print("orchctl: the daemon was undrained meanwhile", file=sys.stderr)
            return EXIT_FAILED
        if drain["running"] == 0:
            return EXIT_OK
        time.sleep(DRAIN_POLL_S)


def _output(args: argparse.Namespace, method: str, result: Any) -> str:
    if args.cmd == "dag":
        from ctl import dag  # here: it needs the graph code, which status has no use for

        draw = {"text": dag.text, "dot": dag.dot, "mermaid": dag.mermaid}[args.format]
        return draw(result)
    if args.cmd == "metrics" and args.prometheus:
        return prometheus.exposition(result).rstrip("\n")
    return render.to_json(result) if args.json else _human(method, result, _colour())


def _follow(client: Client, method: str, params: dict[str, Any], args: argparse.Namespace) -> int:
    try:
        for item in client.stream(method, **params):
            if method == "events":
                text = render.to_json(item) if args.json else render.events_lines([item], _colour())
            elif args.json:
                text = "\n".join(render.to_json(line) for line in item["lines"])
            else:
                text = "\n".join(item["lines"])
            if text:
                print(text, flush=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _confirm(client: Client, method: str, params: dict[str, Any]) -> tuple[int | None, str]:
    """Ask the daemon what the request would do; when that throws work away, have it
    confirmed (ctl/confirm.py). (None to go on, else the exit code; the plan's digest, for
    the daemon to refuse the request if it would now do something else.)"""
    plan = client.call(method, **params, dry_run=True)
    if not confirm.asks(method, plan):
        return None, plan["digest"]
    named = [
        str(v)
        for k, v in params.items()
        if k in ("workstream", "task_id", "worker_id") and v is not None
    ]
    what = " ".join(["orchctl", method.replace("_", " "), *named])
    return confirm.ask(what, confirm.plan_lines(plan), yes=False), plan["digest"]


def _logs(client: Client, params: dict[str, Any]) -> Any:
    """A task's log; for a retired workstream's task (or one whose log file is gone), the
    copy in its archive."""
    try:
        result = client.call("logs", **params)
    except RemoteError as exc:
        if exc.code != "not_found" or "/" not in params["task_id"]:
            raise
        try:
            return client.call("logs_archived", task_id=params["task_id"], lines=params["lines"])
        except RemoteError:
            raise exc from None
    if not result["lines"]:
        try:
            return client.call("logs_archived", task_id=result["task_id"], lines=params["lines"])
        except RemoteError:
            pass
    return result


def _show(client: Client, params: dict[str, Any]) -> Any:
    """A task; one of a retired workstream (named WS/TASK) from its archive."""
    try:
        return client.call("show", **params)
    except RemoteError as exc:
        ws_id, slash, bare = params["task_id"].partition("/")
        if exc.code != "not_found" or not slash:
            raise
        try:
            ws = client.call("ws_show_archived", workstream=ws_id)
        except RemoteError:
            raise exc from None
    found = [t for t in ws["tasks"] if t.get("name") == bare or t.get("id") == params["task_id"]]
    if not found:
        raise RemoteError("not_found", f"no task {bare!r} in retired workstream {ws_id}")
    task: dict[str, Any] = found[0]
    task["log_path"] = f"{ws['archive']}:logs/{bare}.log"
    if params.get("logs"):
        try:
            logs = client.call("logs_archived", task_id=params["task_id"], lines=params["lines"])
            task["log_tail"] = logs["lines"]
        except RemoteError:
            task["log_tail"] = []
    return task


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cmd == "state":
        return statedir.run(args)
    if args.cmd == "top":
        from ctl import top  # imports rich: only for this command, so the others start fast

        return top.run(args)
    if args.cmd == "completion":
        print(completion.SHELLS[args.shell](completion.command_tree(parser)), end="")
        return EXIT_OK
    try:
        method, params = _request(args)
    except OSError as exc:
        print(f"orchctl: {exc.strerror}: {exc.filename}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client(args.socket) as client:
            if method in ("events", "logs") and args.follow:
                return _follow(client, method, params, args)
            if not args.yes and confirm.previewed(method, params):
                refused, params["expect"] = _confirm(client, method, params)
                if refused is not None:
                    return refused
            if method == "submit":
                result = client.submit(**params)
            elif method == "logs":
                result = _logs(client, params)
            elif method == "show":
                result = _show(client, params)
            else:
                result = client.call(method, **params)
            if method == "drain" and args.wait:
                print(_output(args, method, result), flush=True)
                code = _wait_drained(client)
                if code == EXIT_OK and not args.json:
                    print("drained: nothing running")
                return code
            if method == "submit" and args.wait:
                if args.json:
                    print(render.compact({"kind": "submitted"} | result), flush=True)
                else:
                    print(_output(args, method, result), flush=True)
                ws_id = result["workstream_id"]
                try:
                    return follow.wait(
                        args.socket,
                        ws_id,
                        json_lines=args.json,
                        colour=_colour(),
                        after_seq=result["seq"],
                    )
                except KeyboardInterrupt:
                    print(
                        f"orchctl: stopped following; {ws_id} goes on (`orchctl ws show {ws_id}`)",
                        file=sys.stderr,
                    )
                    return 130
    except DaemonUnreachable as exc:
        print(f"orchctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RemoteError as exc:
        print(f"orchctl: {exc.message}", file=sys.stderr)
        return EXIT_CODES.get(exc.code, EXIT_FAILED)
    print(_output(args, method, result))
    if method == "debug" and not args.json:
        if sys.stdin is not None and sys.stdin.isatty() and sys.stdout.isatty():
            chosen = menu.choose(result["actions"])
            if isinstance(chosen, int):
                return chosen
            return main(["--socket", args.socket, *chosen])
        suggestions = menu.suggestions(result["actions"])
        if suggestions:
            print(suggestions)
    return EXIT_OK
