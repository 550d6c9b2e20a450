"""USB backends for the firmware models: the same `ConsoleFirmware` and
`TerminalFirmware`, and boot-keyboard button boxes and badge readers, as
real USB devices on a Linux USB gadget stack (configfs, dummy_hcd in a test
VM).  Run as root in the machine whose kernel is the USB host:

    python3 -m firmware_sim.usb console  --control CTL [--serial S] [--udc dummy_udc.N]
    python3 -m firmware_sim.usb terminal --control CTL --flash F [--serial S]
    python3 -m firmware_sim.usb keyboard|badge --control CTL [--serial S]
    python3 -m firmware_sim.usb type --control CTL --text 04A7F3 | --key 0x1e
    python3 -m firmware_sim.usb ctl --control CTL state|unplug|plug|power-cycle

Modules: `gadget` (configfs), `functionfs` (the FunctionFS formats),
`ffs_console` (the console over FunctionFS), `acm_terminal` (the terminal
over CDC-ACM), `keyboard` (f_hid boot keyboards), `control` (the control
socket, `firmware_sim.server`'s protocol), `cli`, `selfcheck` (guest-side
checks of all of it through the host side of the USB stack).

The daemon (edge/, drivers/) never imports this package.
"""
