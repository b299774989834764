"""Where a task may run: the hosts of the config, the names a task's `runs_on` may use for
them, and the per-host instances of resources. Pure: no I/O.

A host is known by its name in `[[workers.hosts]]` (`Worker.host`), the daemon's own host
by "" in the state and by `local` in what operators write. A *selector* is what a task's
`runs_on` holds: a host's name, one of its `labels`, or `local`; "" (no `runs_on`) is any
host. A workstream pinned to a host (its file's `host`) gives each of its tasks that host
as its selector.

A resource with `per_host = true` is one resource per host: a task that needs
`git_repo_write` and runs on build-2 holds `git_repo_write@build-2` (the *instance* on that
host), which allows `max_holders` holders on each host independently. The instance a task
holds is decided at dispatch and recorded in the task's `holds`, so its release never
depends on a setting that a reload may have changed since.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from supervisor.core.config import Config

LOCAL: Final = "local"
ANY: Final = ""


def host_name(host: str) -> str:
    """How operators name a host: its own name, `local` for the daemon's ("")."""
    return host or LOCAL


def instance(resource: str, host: str) -> str:
    """The id of `resource`'s instance on `host` ("" = local): `git_repo_write@build-2`."""
    return f"{resource}@{host_name(host)}"


class Hosts:
    """The hosts one config names, with their selectors (see the module docstring)."""

    __slots__ = ("_by_selector", "_selectors", "labels", "names", "per_host")

    def __init__(self, cfg: Config | None = None) -> None:
        # host ("" = local) -> its labels, in config order.
        self.labels: dict[str, list[str]] = {ANY: []}
        if cfg is not None:
            for h in cfg.workers.hosts:
                self.labels[h.host] = list(h.labels)
        self.names = [host_name(h) for h in self.labels]
        by: dict[str, set[str]] = {}
        sel: dict[str, tuple[str, ...]] = {}
        for host, labels in self.labels.items():
            own = [host_name(host), *labels]
            for s in own:
                by.setdefault(s, set()).add(host)
            # ANY last: a worker of this host serves any task too.
            sel[host] = (*dict.fromkeys(own), ANY)
        self._by_selector = {s: frozenset(h) for s, h in by.items()}
        self._selectors = sel
        self.per_host: frozenset[str] = frozenset(
            rid for rid, rc in (cfg.resources.items() if cfg is not None else ()) if rc.per_host
        )

    def hosts_for(self, selector: str) -> frozenset[str]:
        """The hosts ("" = local) a selector names; empty when it names none."""
        return self._by_selector.get(selector, frozenset())

    def matches(self, selector: str, host: str) -> bool:
        """A worker on `host` may run a task whose selector is `selector`."""
        return selector == ANY or host in self._by_selector.get(selector, ())

    def selectors_of(self, host: str) -> tuple[str, ...]:
        """Every selector a worker on `host` serves, ANY included. A host the config no
        longer names still serves its own name (its workers may outlive a reload)."""
        return self._selectors.get(host) or (host_name(host), ANY)

    def known(self) -> list[str]:
        """Everything a `runs_on` may name, for error messages: hosts, then labels."""
        labels = [lab for host in self.labels for lab in self.labels[host]]
        return list(dict.fromkeys([*self.names, *labels]))

    def is_host(self, name: str) -> bool:
        """`name` is a host's own name (or `local`), not only a label."""
        return name == LOCAL or (name != ANY and name in self.labels)

    def host_of_name(self, name: str) -> str:
        """The state's host for an operator's host name (`local` -> "")."""
        return ANY if name == LOCAL else name

    def holds(self, resources: Iterable[str], host: str) -> list[str]:
        """The resource ids a task needing `resources` holds when it runs on `host`."""
        per = self.per_host
        return [instance(r, host) if r in per else r for r in resources]


def of(cfg: Config, cache: dict[int, tuple[Config, Hosts]]) -> Hosts:
    """`Hosts(cfg)`, built once per config object (`cache` is the caller's)."""
    got = cache.get(id(cfg))
    if got is not None and got[0] is cfg:
        return got[1]
    hosts = Hosts(cfg)
    cache.clear()
    cache[id(cfg)] = (cfg, hosts)
    return hosts
