#!/bin/busybox sh
# Stage 1 of the VM tier's guest, PID 1 in the initramfs (busybox only).
#
# The guest's root is the host's root (9p, read-only) under a tmpfs overlay:
# the host's python3, udev, setpriv and the installed project are there
# unchanged, and whatever the guest writes (its own /etc/passwd with the
# service user, /run, /opt) stays in guest memory.  Then busybox init in that
# root runs stage2.sh (users, udevd) and the agent, and reaps orphans: the
# daemon is SIGKILLed in tests, and a zombie would still answer `kill -0`.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "vm: $* at $(cut -d' ' -f1 /proc/uptime /newroot/proc/uptime 2>/dev/null) s"; }
die() { say "FAILED: $*"; poweroff -f; }
say "init"

opt() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^vm\.$1=//p"; }
# One UDC per gadget plugged at the same time; dummy_hcd takes the count only at load.
udcs=$(opt udcs)
for m in $(cat /mods/order); do
    args=
    [ "$m" = dummy_hcd.ko ] && args="num=${udcs:-1}"
    insmod "/mods/$m" $args || say "insmod $m failed"
done
say "modules loaded"

# A 9p cache mode only to measure with: cache=loose made Python's imports no
# faster (ext4 images do, see assets.py), and without it the guest always sees
# the host's files as they are.
rootcache=$(opt rootcache)

# QEMU's user network: the host's loopback is 10.0.2.2 from here.
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
    || say "no network"

mkdir -p /lower /rw /newroot
mount -t 9p -o "trans=virtio,version=9p2000.L,ro,msize=512000${rootcache:+,cache=$rootcache}" \
    hostroot /lower || die "9p hostroot"
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work root /newroot \
    || die "overlay root"
for d in proc sys dev; do mount --move "/$d" "/newroot/$d"; done
mount -t configfs none /newroot/sys/kernel/config
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
# The host's /tmp and /run must not leak in (they are the host's, read-only).
mount -t tmpfs -o mode=1777 tmp /newroot/tmp
mount -t tmpfs -o mode=0755 run /newroot/run
# The share with the test: cache=none, so each side sees the other's writes at once.
mkdir -p /newroot/share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share /newroot/share \
    || die "9p share"
mkdir -p /newroot/vm
cp -a /vm/. /newroot/vm/
cp /bin/busybox /newroot/vm/busybox
cat > /newroot/etc/inittab <<'TAB'
::sysinit:/bin/sh /vm/stage2.sh
::once:/bin/sh /vm/agent.sh
::once:/bin/sh /vm/scenario.sh
TAB
say "root ready"
exec switch_root /newroot /vm/busybox init
