"""Settings: the bundled config/orchd.toml, refusals that name the key and the file, diff."""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from supervisor.core.config import Config, diff, parse_config
from supervisor.core.errors import ConfigError
from supervisor.service.reload import load_config

BUNDLED = Path(__file__).resolve().parent.parent / "config" / "orchd.toml"


def setting_names(struct: type[msgspec.Struct], prefix: str = "") -> list[str]:
    """Dotted names of every setting of a config Struct (tables recursed into)."""
    names: list[str] = []
    for field in msgspec.structs.fields(struct):
        factory = field.default_factory
        if isinstance(factory, type) and issubclass(factory, msgspec.Struct):
            names += setting_names(factory, f"{prefix}{field.name}.")
        else:
            names.append(prefix + field.name)
    return names


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "orchd.toml"
    path.write_text(text)
    return path


def test_bundled_config_equals_defaults_except_where_documented() -> None:
    """config/orchd.toml parses and differs from the defaults only in its two bundled
    choices: two workers and the git_repo_write resource."""
    cfg = load_config(BUNDLED)
    assert sorted(diff(Config(), cfg)) == ["resources.git_repo_write", "workers.count"]
    assert cfg.workers.count == 2
    assert cfg.resources["git_repo_write"].max_holders == 1
    assert cfg.state_dir == ".state"


def test_bundled_config_names_every_setting() -> None:
    """Every setting of the Config Structs appears in config/orchd.toml."""
    raw = tomllib.loads(BUNDLED.read_text())
    missing = []
    for name in setting_names(Config):
        node: object = raw
        for part in name.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is KeyError:
            missing.append(name)
    assert missing == []


def test_bundled_config_comments_every_setting() -> None:
    """Each setting in config/orchd.toml has a comment on its line or just above it."""
    lines = [line.strip() for line in BUNDLED.read_text().splitlines()]

    def is_setting(line: str) -> bool:
        return "=" in line and not line.startswith("#")

    bare = []
    for i, line in enumerate(lines):
        if not is_setting(line) or "#" in line:
            continue
        j = i - 1  # a comment may head a group of related settings
        while j >= 0 and is_setting(lines[j]):
            j -= 1
        if j < 0 or not lines[j].startswith("#"):
            bare.append(line)
    assert bare == []


def test_no_file_means_defaults() -> None:
    """load_config(None) gives the built-in defaults."""
    assert load_config(None) == Config()
    assert Config().socket.endswith(".state/orchd.sock")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("bogus = 1\n", ["bogus"]),
        ("[tasks]\ntimeout = 5\n", ["timeout", "tasks"]),
        ("[workers]\ncount = 'two'\n", ["workers.count", "int"]),
        ("[log]\nlevel = 'loud'\n", ["log.level"]),
        ("[resources.db]\nmax_holders = 'x'\n", ["resources.db.max_holders"]),
        ("[resources.ok]\n[resources.db]\nholders = 2\n", ["resources.db", "holders"]),
        ("[tasks]\ntimeout_s = 0\n", ["tasks.timeout_s", "> 0"]),
        ("[tasks]\nbackoff_jitter = 2\n", ["tasks.backoff_jitter"]),
        ("[store]\nbackups_keep = -1\n", ["store.backups_keep"]),
        ("[workers]\ncount = -2\n", ["workers.count"]),
        ("[health]\nunresponsive_after_s = 60\nshutdown_after_s = 10\n", ["shutdown_after_s"]),
        ("[resources.db]\nmax_holders = 0\n", ["resources.db.max_holders"]),
        ("shutdown_grace_s = 0\n", ["shutdown_grace_s"]),
        ("state_dir = \n", ["not valid TOML"]),
    ],
)
def test_bad_config_names_the_key_and_the_file(tmp_path: Path, text: str, words: list[str]) -> None:
    """An unknown key, a wrong type or a value out of range is refused with a message
    naming the file and the key."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message


def test_every_range_problem_is_named_at_once() -> None:
    """Several values out of range are all reported in one error."""
    with pytest.raises(ConfigError) as err:
        parse_config(b"[tasks]\ntimeout_s = -1\nmax_retries = -1\n", "x.toml")
    assert "tasks.timeout_s" in str(err.value)
    assert "tasks.max_retries" in str(err.value)


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    """A missing config file is a ConfigError naming the path, not a traceback."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml"):
        load_config(path)


def test_zero_is_allowed_where_it_means_off() -> None:
    """Jitter, queue timeout, kill grace, back-off base and segment size (never sealed)
    may be 0; a negative segment size is refused."""
    cfg = parse_config(
        b"[tasks]\nbackoff_jitter = 0\nqueue_timeout_s = 0\nkill_grace_s = 0\n"
        b"backoff_base_s = 0\n[workers]\ncount = 0\n[store]\nsegment_bytes = 0\n"
    )
    assert cfg.tasks.kill_grace_s == 0
    assert cfg.worker_count >= 1
    assert cfg.store.segment_bytes == 0
    with pytest.raises(ConfigError, match=r"store\.segment_bytes"):
        parse_config(b"[store]\nsegment_bytes = -1\n")


def test_diff_names_changed_settings() -> None:
    """diff() lists the dotted names of the settings that differ, and nothing else."""
    old = parse_config(b"[tasks]\ntimeout_s = 60\n[resources.a]\nmax_holders = 1\n")
    new = parse_config(
        b"[tasks]\ntimeout_s = 90\n[resources.a]\nmax_holders = 2\n"
        b"[resources.b]\n[log]\nlevel = 'debug'\n"
    )
    assert diff(old, new) == [
        "log.level",
        "resources.a.max_holders",
        "resources.b",
        "tasks.timeout_s",
    ]
    assert diff(new, new) == []
