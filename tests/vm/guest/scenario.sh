#!/bin/sh
# Runs the test's scenario, if it gave one ($VM/scenario, any executable with a
# shebang), as root in the ready guest; its exit status goes to
# $VM/scenario.rc, then the guest powers off unless the test keeps it up.
. /vm/env.sh
[ -f "$VM/scenario" ] || exit 0
echo "vm: scenario starts at $(cut -d' ' -f1 /proc/uptime) s"
cd /
"$VM/scenario" < /dev/null > "$SHARE/scenario.log" 2>&1
rc=$?
echo "vm: scenario exited with $rc at $(cut -d' ' -f1 /proc/uptime) s"
echo "$rc" > "$VM/scenario.rc.tmp" && mv "$VM/scenario.rc.tmp" "$VM/scenario.rc"
if [ "${VM_POWEROFF_AFTER_SCENARIO:-1}" = 1 ]; then
    sync
    /vm/busybox poweroff -f
fi
