#!/usr/bin/env bash
# The first process of fresh pid, mount, cgroup, uts and ipc namespaces (started by
# tests/systemd_box.py): makes every place that systemd, install.sh or the tests write
# private to this box, then becomes systemd. Any step that fails stops here, before
# systemd runs, so a half-made box never touches the host.
#
#   systemd_box.sh BOX     BOX: an empty directory of the test's; it receives the
#                          overlay layers and is visible inside as /mnt
set -euo pipefail

box=$1
# BOX lives under the host's /tmp, which is covered next: keep it reachable as /mnt.
mount --bind "$box" /mnt

# Never boot without these: systemd-tmpfiles-setup empties /tmp and /var/tmp.
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp

# Copy-on-write views of every tree that gets written: changes land in /mnt/ovl.
for dir in /etc /var /opt /usr/local /root; do
    layer=/mnt/ovl/${dir//\//_}
    mkdir -p "$layer/upper" "$layer/work"
    mount -t overlay overlay \
        -o "lowerdir=$dir,upperdir=$layer/upper,workdir=$layer/work" "$dir"
done
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run

# A /dev of its own, so tmpfiles rules and device units never change the host's nodes.
mkdir -p /mnt/dev
mount -t tmpfs -o mode=0755,nosuid tmpfs /mnt/dev
for node in null zero full random urandom tty; do
    touch "/mnt/dev/$node"
    mount --bind "/dev/$node" "/mnt/dev/$node"
done
mkdir /mnt/dev/pts /mnt/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /mnt/dev/pts
ln -s pts/ptmx /mnt/dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /mnt/dev/shm
ln -s /proc/self/fd /mnt/dev/fd
ln -s /proc/self/fd/0 /mnt/dev/stdin
ln -s /proc/self/fd/1 /mnt/dev/stdout
ln -s /proc/self/fd/2 /mnt/dev/stderr
mount --move /mnt/dev /dev

# The kernel's settings stay out of reach (sysctl, sysrq, sysfs); the cgroup tree is a
# fresh cgroup2 mount rooted at this box's own cgroup (the cgroup namespace).
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
if [ -e /proc/sysrq-trigger ]; then
    mount --bind /proc/sysrq-trigger /proc/sysrq-trigger
    mount -o remount,bind,ro /proc/sysrq-trigger
fi
mount --bind /sys /sys
mount -o remount,bind,ro,nosuid,nodev,noexec /sys
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup

# Units that would change the shared kernel (modules, binfmt, sysctl, entropy pool, the
# root file system's mount flags) or are of no use here (timers).
for unit in systemd-modules-load.service kmod-static-nodes.service modprobe@.service \
        systemd-binfmt.service proc-sys-fs-binfmt_misc.automount systemd-sysctl.service \
        systemd-random-seed.service systemd-pstore.service systemd-hwdb-update.service \
        systemd-firstboot.service systemd-machine-id-commit.service \
        systemd-timesyncd.service systemd-remount-fs.service sys-kernel-config.mount \
        sys-kernel-debug.mount sys-kernel-tracing.mount sys-fs-fuse-connections.mount \
        apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
        man-db.timer systemd-tmpfiles-clean.timer; do
    ln -sf /dev/null "/etc/systemd/system/$unit"
done

for dir in /tmp /var/tmp /run; do
    [ "$(stat -f -c %T "$dir")" = tmpfs ] || { echo "box: $dir is not a tmpfs" >&2; exit 1; }
done
exec env -i container=orchdtest /lib/systemd/systemd --system --unit=basic.target
