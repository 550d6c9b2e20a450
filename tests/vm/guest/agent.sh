#!/bin/sh
# The test's command channel: the virtio serial port named "agent".  The test
# writes a script to $VM/cmd/ID.sh and sends the line "ID USER"; the script runs
# as USER with its output in $VM/cmd/ID.out and ID.err, and "ID STATUS" goes back
# when it has exited.  Each request runs in its own subshell, so a slow one
# does not hold up the next; each answer is one short write, so answers do not
# interleave.
. /vm/env.sh
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = agent ] && port=/dev/${p##*/}
done
[ -n "$port" ] || { echo "vm: no agent port"; exit 1; }
mkdir -p "$VM/cmd"
cd /
exec 3<>"$port"
echo "vm: agent ready at $(cut -d' ' -f1 /proc/uptime) s"
echo "ready $(cut -d' ' -f1 /proc/uptime)" >&3
while read -r id user <&3; do
    (
        c=$VM/cmd/$id
        if [ "$user" = root ]; then
            /bin/sh "$c.sh" < /dev/null > "$c.out" 2> "$c.err" 3>&-
        else
            as-user "$user" /bin/sh "$c.sh" < /dev/null > "$c.out" 2> "$c.err" 3>&-
        fi
        echo "$id $?" >&3
    ) &
done
