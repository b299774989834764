#!/usr/bin/env bash
# Install or upgrade orchd as a systemd service, as root, from a checkout or an unpacked
# release:
#
#   sudo systemd/install.sh [--enable] [WHEEL]
#
# - a virtualenv at /opt/orchd made by the system Python (/usr/bin/python3), with orchd
#   installed from this tree, or from WHEEL when one is given;
# - /usr/local/bin/orchctl and /usr/local/bin/orchd linked into it;
# - the unit /etc/systemd/system/orchd.service, /etc/sysusers.d/orchd.conf (the orchd
#   user and group) and /etc/tmpfiles.d/orchd.conf (the state directory), then
#   systemd-sysusers, systemd-tmpfiles and `systemctl daemon-reload`;
# - /etc/orchd/orchd.toml only when there is none: an existing config is never changed,
#   and a new default that differs from it is written beside it as orchd.toml.new;
# - --enable: enable the service and start it, waiting until it is ready.
#
# Run it again to upgrade: the venv is updated in place, the service is restarted only if
# it was running, and /var/lib/orchd (the state) is left as it is.
# Exit codes: 0 done, 1 failed, 2 usage error.
set -euo pipefail

PREFIX=/opt/orchd
PYTHON=/usr/bin/python3
UNIT=/etc/systemd/system/orchd.service
SYSUSERS=/etc/sysusers.d/orchd.conf
TMPFILES=/etc/tmpfiles.d/orchd.conf
CONFIG=/etc/orchd/orchd.toml
DOC=/usr/local/share/doc/orchd
BIN=/usr/local/bin

say() { printf 'orchd install: %s\n' "$*"; }
die() { printf 'orchd install: %s\n' "$*" >&2; exit 1; }
usage() {
    printf 'usage: %s [--enable] [WHEEL]\n' "$0" >&2
    exit 2
}

enable=0
wheel=
while [ $# -gt 0 ]; do
    case $1 in
        --enable) enable=1 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        -*) printf 'orchd install: unknown option %s\n' "$1" >&2; usage ;;
        *) [ -z "$wheel" ] || usage; wheel=$1 ;;
    esac
    shift
done

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ -f "$src/systemd/orchd.service" ] && [ -f "$src/config/orchd.toml" ] \
    || die "run me from a checkout or an unpacked release ($src has no systemd/orchd.service)"
if [ -n "$wheel" ]; then
    case $wheel in *.whl) ;; *) die "$wheel is not a wheel (*.whl)" ;; esac
    [ -f "$wheel" ] || die "no such file: $wheel"
    wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
else
    [ -f "$src/pyproject.toml" ] || die "$src has no pyproject.toml; give a wheel instead"
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (sudo $0)"
command -v systemctl >/dev/null && [ -d /run/systemd/system ] \
    || die "systemd is not running on this host"
[ -x "$PYTHON" ] || die "$PYTHON not found: apt-get install python3 python3-venv"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "orchd needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>&1)"
# Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a package of its own.
"$PYTHON" -c 'import ensurepip; ensurepip.version()' 2>/dev/null \
    || die "$PYTHON cannot make a virtualenv (no ensurepip): apt-get install python3-venv"

# Everything installed is readable by the orchd user, whatever root's umask is.
umask 022
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

was_active=0
systemctl is-active --quiet orchd.service && was_active=1

# A venv made by another Python (the system one was upgraded) no longer runs: remake it.
want=$("$PYTHON" -c 'import sys; print(*sys.version_info[:2])')
have=$("$PREFIX/bin/python" -c 'import sys; print(*sys.version_info[:2])' 2>/dev/null || true)
if [ "$have" = "$want" ]; then
    say "upgrading the venv in $PREFIX"
elif [ -f "$PREFIX/pyvenv.cfg" ]; then
    say "remaking the venv in $PREFIX for $("$PYTHON" --version)"
    "$PYTHON" -m venv --clear "$PREFIX"
elif [ -e "$PREFIX" ]; then
    die "$PREFIX exists and is not a venv; move it away first"
else
    say "making a venv in $PREFIX with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$PREFIX"
fi

pip=("$PREFIX/bin/python" -m pip --quiet --disable-pip-version-check)
if [ -n "$wheel" ]; then
    target=$wheel
else
    # pip builds in the source tree; build from a copy so the checkout stays as it is and
    # may be read-only.
    target=$work/src
    mkdir "$target"
    cp -R "$src/pyproject.toml" "$src/README.md" "$src/supervisor" "$src/ctl" "$target/"
fi
"${pip[@]}" install --no-warn-script-location --upgrade "$target" || die "pip could not install orchd from $target"
version=$("$PREFIX/bin/python" -c 'import importlib.metadata as m; print(m.version("orchd"))')
say "orchd $version is in $PREFIX"

for name in orchctl orchd; do
    link=$BIN/$name
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        say "warning: $link is not a link (an older install?); left as it is"
    else
        ln -sfn "$PREFIX/bin/$name" "$link"
    fi
done

install -D -m 0644 "$src/systemd/orchd.service" "$UNIT"
install -D -m 0644 "$src/systemd/orchd.sysusers.conf" "$SYSUSERS"
install -D -m 0644 "$src/systemd/orchd.tmpfiles.conf" "$TMPFILES"
install -D -m 0644 "$src/README.md" "$DOC/README.md"
systemd-sysusers "$SYSUSERS"
systemd-tmpfiles --create "$TMPFILES"

# The default config, with the paths the unit uses.
sed -e 's|^state_dir = .*|state_dir = "/var/lib/orchd"|' \
    -e 's|^socket_path = .*|socket_path = "/run/orchd/orchd.sock"|' \
    "$src/config/orchd.toml" >"$work/orchd.toml"
if [ ! -e "$CONFIG" ]; then
    install -D -m 0644 "$work/orchd.toml" "$CONFIG"
    say "wrote $CONFIG"
elif cmp -s "$work/orchd.toml" "$CONFIG"; then
    rm -f "$CONFIG.new"
else
    install -m 0644 "$work/orchd.toml" "$CONFIG.new"
    say "kept $CONFIG; the new default is $CONFIG.new (compare: diff -u $CONFIG $CONFIG.new)"
fi

systemctl daemon-reload
if [ "$enable" -eq 1 ]; then
    systemctl enable --quiet orchd.service
fi
# start and restart of a Type=notify unit return once the daemon reported READY=1.
if [ "$was_active" -eq 1 ]; then
    say "restarting orchd (it was running)"
    systemctl restart orchd.service || die "orchd did not restart: journalctl -u orchd -n 50"
elif [ "$enable" -eq 1 ]; then
    systemctl reset-failed orchd.service 2>/dev/null || true
    say "starting orchd"
    systemctl start orchd.service || die "orchd did not start: journalctl -u orchd -n 50"
fi

if systemctl is-active --quiet orchd.service; then
    say "orchd is running: systemctl status orchd; orchctl status"
else
    say "installed; start it with: systemctl enable --now orchd"
fi
say "operators: usermod -aG orchd NAME, and list NAME in [control] users of $CONFIG"
