#!/bin/sh
# Bookworm first boot of a Pi provisioned by `feedback-edge provision`.
#
# Raspberry Pi OS Bookworm has no cloud-init; like Raspberry Pi Imager's own
# customisation, provision appends `systemd.run=<this script>
# systemd.run_success_action=reboot systemd.unit=kernel-command-line.target`
# to cmdline.txt, so the first boot runs this once, as root, then reboots
# into the normal system.  Settings come from plain files next to this
# script (never interpolated into shell code); the output goes to
# install.log on the boot partition, readable from the card on any laptop.
set -u
HERE=/boot/firmware/feedback
exec >>"$HERE/install.log" 2>&1

# The hook stays on the command line until this script has run to its end,
# for at most MAX_ATTEMPTS boots: a Pi unplugged in the middle of its first
# boot tries again at the next one instead of staying half installed for
# ever, and a fault that kills the boot itself does not loop for ever either.
# Every failure that lets the script go on ends it normally: no retry.
MAX_ATTEMPTS=3
ATTEMPT=$(cat "$HERE/attempts" 2>/dev/null | tr -cd 0-9 | cut -c1-3)
ATTEMPT=$((${ATTEMPT:-0} + 1))
echo "$ATTEMPT" >"$HERE/attempts"
sync
echo "firstrun: started $(date -u +%Y-%m-%dT%H:%M:%SZ) (attempt $ATTEMPT of $MAX_ATTEMPTS)"

unhook() {
    sed -i 's| systemd\.run=/boot/firmware/feedback/firstrun\.sh systemd\.run_success_action=reboot systemd\.unit=kernel-command-line\.target||' \
        /boot/firmware/cmdline.txt
    sync
}
if [ "$ATTEMPT" -ge "$MAX_ATTEMPTS" ]; then
    echo "firstrun: the last attempt: the first-boot hook is removed now"
    unhook
fi

if [ -f "$HERE/hostname" ]; then
    NAME=$(cat "$HERE/hostname")
    OLD=$(tr -d ' \t\n\r' </etc/hostname)
    echo "$NAME" >/etc/hostname
    sed -i "s/127\.0\.1\.1.*$OLD/127.0.1.1\t$NAME/" /etc/hosts
    echo "firstrun: hostname $NAME"
fi

if [ -f "$HERE/authorized_keys" ]; then
    ADMIN=$(cat "$HERE/admin-user")
    if [ -x /usr/lib/userconf-pi/userconf ]; then
        # Renames the image's first user; '!' locks the password: keys only.
        /usr/lib/userconf-pi/userconf "$ADMIN" '!'
    elif ! id "$ADMIN" >/dev/null 2>&1; then
        useradd -m -s /bin/bash -G sudo,adm "$ADMIN"
    fi
    HOME_DIR=$(getent passwd "$ADMIN" | cut -d: -f6)
    install -d -m 0700 -o "$ADMIN" -g "$ADMIN" "$HOME_DIR/.ssh"
    install -m 0600 -o "$ADMIN" -g "$ADMIN" "$HERE/authorized_keys" "$HOME_DIR/.ssh/authorized_keys"
    echo "$ADMIN ALL=(ALL) NOPASSWD: ALL" >/etc/sudoers.d/010-feedback-admin
    chmod 0440 /etc/sudoers.d/010-feedback-admin
    printf 'PasswordAuthentication no\n' >/etc/ssh/sshd_config.d/10-feedback-keys-only.conf
    systemctl enable ssh
    echo "firstrun: ssh enabled for $ADMIN (keys only)"
fi

if [ -f "$HERE/wifi.nmconnection" ]; then
    install -D -m 0600 "$HERE/wifi.nmconnection" \
        /etc/NetworkManager/system-connections/feedback-wifi.nmconnection
    rm -f "$HERE/wifi.nmconnection"
    COUNTRY=$(cat "$HERE/wifi-country")
    raspi-config nonint do_wifi_country "$COUNTRY" || iw reg set "$COUNTRY" || true
    rfkill unblock wifi || true
    for f in /var/lib/systemd/rfkill/*:wlan; do
        [ -e "$f" ] && echo 0 >"$f"
    done
    echo "firstrun: wifi configured (country $COUNTRY)"
fi

if [ -f "$HERE/installed" ]; then
    # Cut off after the install but before the hook went: nothing to redo
    # (install.sh has already taken the config's secrets off the card).
    echo "firstrun: already installed at $(cat "$HERE/installed")"
else
    sh "$HERE/install.sh" || echo "firstrun: the install FAILED; see above"
fi
unhook
echo "firstrun: finished, rebooting"
exit 0
