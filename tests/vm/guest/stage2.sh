#!/bin/sh
# Stage 2, run by busybox init in the guest's root (the host's Debian userland):
# the project as the Pi's first boot installed it, its service user, the
# store's disk, and Debian's systemd-udevd with the project's rules.
. /vm/env.sh
say() { echo "vm: $* at $(cut -d' ' -f1 /proc/uptime) s"; }
fail() { say "FAILED: $*"; echo "$*" > "$VM/failed"; sync; /vm/busybox poweroff -f; }

disk() {
    for b in /sys/block/vd*; do
        [ "$(cat "$b/serial" 2>/dev/null)" = "$1" ] && echo "/dev/${b##*/}"
    done
}
# The install lives on the host (FEEDBACK_ROOT of install.sh, seen here through
# 9p at the same path); bound at /opt/feedback-edge, where the unit runs it from.
# Its venv's scripts name their interpreter by the install-time path, which
# this guest also sees, so /opt/feedback-edge/venv/bin/feedback-edge runs as is.
# The same files also come as read-only ext4 images (see assets.py: Python
# imports faster from them than through 9p), mounted over the same paths.
opt=$(disk feedback-opt)
if [ -n "$opt" ]; then
    mount -t ext4 -o ro,noload "$opt" "$FEEDBACK_INSTALL_ROOT/opt/feedback-edge" \
        || fail "mount $opt"
fi
stdlib=$(disk python-stdlib)
if [ -n "$stdlib" ]; then
    mount -t ext4 -o ro,noload "$stdlib" "$VM_STDLIB" || fail "mount $stdlib"
fi
mkdir -p /opt/feedback-edge
mount --bind "$FEEDBACK_INSTALL_ROOT/opt/feedback-edge" /opt/feedback-edge || fail "bind /opt"

# The service user, as systemd-sysusers makes it on the Pi; the group must
# exist before udevd reads rules that name it.
mkdir -p /etc/sysusers.d /etc/udev/rules.d
cp "$FEEDBACK_INSTALL_ROOT/etc/sysusers.d/feedback-edge.conf" /etc/sysusers.d/
systemd-sysusers /etc/sysusers.d/feedback-edge.conf || fail "systemd-sysusers"
rm -rf /etc/feedback-edge
cp -a "$FEEDBACK_INSTALL_ROOT/etc/feedback-edge" /etc/feedback-edge
chgrp -R feedback-edge /etc/feedback-edge
cp "$FEEDBACK_INSTALL_ROOT"/etc/udev/rules.d/*.rules /etc/udev/rules.d/

# What the unit's StateDirectory= and RuntimeDirectory= would make.
install -d -o feedback-edge -g feedback-edge -m 0750 /var/lib/feedback-edge
install -d -o feedback-edge -g feedback-edge -m 0755 /run/feedback-edge
store=$(disk feedback-store)
if [ -n "$store" ]; then
    mkdir -p "$VM_DISK_MOUNT"
    mount -t ext4 "$store" "$VM_DISK_MOUNT" || fail "mount $store on $VM_DISK_MOUNT"
    if [ "$VM_DISK_MOUNT" = /var/lib/feedback-edge ]; then
        chown feedback-edge:feedback-edge "$VM_DISK_MOUNT"
        chmod 0750 "$VM_DISK_MOUNT"
    fi
fi
say "users and directories"

udevd=/lib/systemd/systemd-udevd
[ -x "$udevd" ] || udevd=/usr/lib/systemd/systemd-udevd
SYSTEMD_IGNORE_CHROOT=1 "$udevd" --daemon > "$VM/udevd.log" 2>&1 || fail "systemd-udevd"
udevadm control --ping --timeout=30 || fail "udevd does not answer"
# No coldplug (udevadm trigger): every USB device of this tier is plugged by a
# test after boot (gadgets live in configfs, in memory), so udevd sees each
# one's events as they happen, as on a Pi where a console is plugged in.
say "udevd ready"
