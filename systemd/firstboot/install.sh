#!/bin/sh
# First-boot installer of the clinic feedback edge daemon.
#
# `feedback-edge provision` copies this script, the site's config, the unit
# files and a wheelhouse onto the Pi's boot partition (/boot/firmware/feedback);
# cloud-init (Trixie) or firstrun.sh (Bookworm) runs it once, as root, with
# no network: everything it installs comes from that folder.
#
# FEEDBACK_ROOT installs into another root directory instead of / (the tests
# run the whole script that way); then nothing is started.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=${FEEDBACK_ROOT:-}
VENV=$ROOT/opt/feedback-edge/venv
WHEELS=$HERE/wheels
ETC=$ROOT/etc/feedback-edge

say() { echo "feedback-edge install: $*"; }
# A failed install leaves no secrets on the FAT partition either (anyone who
# holds the card can read it); the installer provisions the card again.
fail() {
    echo "feedback-edge install: FAILED: $*" >&2
    rm -rf "$HERE/site"
    exit 1
}

say "started $(date -u +%Y-%m-%dT%H:%M:%SZ) from $HERE"
[ -f "$HERE/site/edge.toml" ] || fail "no site/edge.toml next to this script"

# 1. The daemon in its own virtual environment, offline.  --without-pip:
#    Raspberry Pi OS may lack Debian's python3-venv (ensurepip); pip is
#    bootstrapped from its own wheel instead, which runs straight from the file.
PIP_WHEEL=$(ls "$WHEELS"/pip-*.whl 2>/dev/null | head -n 1)
[ -n "$PIP_WHEEL" ] || fail "no pip wheel in $WHEELS"
python3 -m venv --without-pip --clear "$VENV" || fail "python3 -m venv"
"$VENV/bin/python" "$PIP_WHEEL/pip" install --quiet --no-index --find-links "$WHEELS" pip \
    || fail "pip bootstrap"
PIP="$VENV/bin/python -m pip install --quiet --no-index --find-links $WHEELS"
$PIP feedback-edge || fail "pip install feedback-edge from $WHEELS"
say "installed $("$VENV/bin/feedback-edge" --version 2>/dev/null || echo feedback-edge)"

# The command for the admin on the Pi (`sudo feedback-edge status`): on
# PATH, and on sudo's secure_path.
install -d "$ROOT/usr/local/bin"
ln -sf /opt/feedback-edge/venv/bin/feedback-edge "$ROOT/usr/local/bin/feedback-edge"

# 2. The site's config and the files it names (secrets: root and the
#    service group only).
install -d -m 0750 "$ETC"
cp -R "$HERE/site/." "$ETC/"
"$VENV/bin/feedback-edge" check-config "$ETC/edge.toml" || fail "config refused"

# 3. Service user, unit, udev rules.
install -D -m 0644 "$HERE/system/feedback-edge.sysusers" "$ROOT/etc/sysusers.d/feedback-edge.conf"
install -D -m 0644 "$HERE/system/feedback-edge.service" \
    "$ROOT/etc/systemd/system/feedback-edge.service"
for rules in "$HERE"/system/*.rules; do
    install -D -m 0644 "$rules" "$ROOT/etc/udev/rules.d/$(basename "$rules")"
done
systemd-sysusers --root="${ROOT:-/}" || fail "systemd-sysusers"
GID=$(awk -F: '$1 == "feedback-edge" { print $3 }' "$ROOT/etc/group")
[ -n "$GID" ] || fail "the feedback-edge group was not created"
chown -R "0:$GID" "$ETC"
chmod -R u=rwX,g=rX,o= "$ETC"

# 4. Start, and keep starting on every boot.
if [ -z "$ROOT" ]; then
    systemctl daemon-reload
    udevadm control --reload
    udevadm trigger --action=add --subsystem-match=hidraw --subsystem-match=tty \
        --subsystem-match=input || true
    # `start` waits for READY=1 (Type=notify), or for the daemon to exit.
    if ! systemctl enable --now feedback-edge.service; then
        # The daemon's own words (config errors, devices, store): the journal
        # never holds phone numbers, comments or badge numbers.
        journalctl -u feedback-edge.service -b --no-pager -o cat -n 20 || true
        fail "the service did not start: $(systemctl show feedback-edge.service \
            --property=Result --value) (the daemon's log is above)"
    fi
    say "the service is running: $(systemctl show feedback-edge.service \
        --property=StatusText --value)"
else
    systemctl --root="$ROOT" enable feedback-edge.service || fail "systemctl enable"
fi

# 5. The FAT boot partition is readable by anyone who holds the card: the
#    config's secrets leave it once installed.
rm -rf "$HERE/site"
date -u +%Y-%m-%dT%H:%M:%SZ > "$HERE/installed"
say "done; the service is enabled"
