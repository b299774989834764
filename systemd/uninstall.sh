#!/usr/bin/env bash
# Remove what systemd/install.sh installed, as root:
#
#   sudo systemd/uninstall.sh [--purge] [--yes]
#
# Stops and disables the service, then removes the venv /opt/orchd, the unit, the
# sysusers and tmpfiles files, the documentation and the /usr/local/bin links.
# The state (/var/lib/orchd) and the config (/etc/orchd) are kept, unless --purge: that
# removes them too, after asking on a terminal (--yes answers for you; with no terminal
# and no --yes nothing is changed and the exit code is 2). The orchd user and group are
# kept, since files elsewhere (build trees) may still belong to them.
# Exit codes: 0 done, 1 failed or declined, 2 usage error or confirmation needed.
set -euo pipefail

PREFIX=/opt/orchd
UNIT=/etc/systemd/system/orchd.service
SYSUSERS=/etc/sysusers.d/orchd.conf
TMPFILES=/etc/tmpfiles.d/orchd.conf
DOC=/usr/local/share/doc/orchd
BIN=/usr/local/bin
STATE=/var/lib/orchd
CONFIG_DIR=/etc/orchd

say() { printf 'orchd uninstall: %s\n' "$*"; }
die() { printf 'orchd uninstall: %s\n' "$1" >&2; exit "${2:-1}"; }

purge=0
yes=0
for arg in "$@"; do
    case $arg in
        --purge) purge=1 ;;
        --yes) yes=1 ;;
        -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) die "unknown argument $arg (usage: $0 [--purge] [--yes])" 2 ;;
    esac
done

[ "$(id -u)" -eq 0 ] || die "must run as root (sudo $0)"

# Ask before anything is changed, so a refusal leaves the install whole.
if [ "$purge" -eq 1 ] && [ "$yes" -eq 0 ]; then
    [ -t 0 ] || die "--purge deletes $STATE and $CONFIG_DIR: run it on a terminal or add --yes" 2
    read -r -p "Delete the state in $STATE and the config in $CONFIG_DIR for good? [y/N] " answer
    case $answer in
        y|Y|yes|YES) ;;
        *) die "nothing removed" ;;
    esac
fi

if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    if systemctl cat orchd.service >/dev/null 2>&1; then
        say "stopping and disabling orchd"
        systemctl disable --now --quiet orchd.service || die "could not stop orchd"
    fi
fi

for name in orchctl orchd; do
    link=$BIN/$name
    if [ -L "$link" ] && [[ $(readlink "$link") == "$PREFIX"/* ]]; then
        rm -f "$link"
    fi
done
# Only a venv: never a directory of someone else's that happens to have this name.
if [ -f "$PREFIX/pyvenv.cfg" ]; then
    rm -rf "$PREFIX"
elif [ -e "$PREFIX" ]; then
    say "warning: $PREFIX is not a venv; left as it is"
fi
rm -rf "$DOC"
rm -f "$UNIT" "$SYSUSERS" "$TMPFILES"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl reset-failed orchd.service 2>/dev/null || true
fi
say "removed $PREFIX, the unit and the links"

if [ "$purge" -eq 1 ]; then
    rm -rf "$STATE" "$CONFIG_DIR"
    say "removed $STATE and $CONFIG_DIR"
else
    say "kept $STATE (state) and $CONFIG_DIR (config); --purge removes them"
fi
