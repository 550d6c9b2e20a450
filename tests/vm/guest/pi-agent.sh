#!/bin/sh
# The Pi tier's agent (started by vm-agent.service in the Debian image, see
# tests/vm/debian.py): the gadget side of USB for the simulated devices, then
# the same command channel as the USB tier.  A Pi has a USB host controller;
# here dummy_hcd gives the guest both ends, one UDC per device plugged at once.
. /vm/env.sh
modprobe -a configfs libcomposite usb_f_fs usb_f_hid usb_f_acm
modprobe dummy_hcd "num=${VM_UDCS:-1}"
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
exec /bin/sh /vm/agent.sh
