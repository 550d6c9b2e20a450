"""`python3 -m firmware_sim.usb ...`: see `firmware_sim.usb.cli`."""

import sys

from firmware_sim.usb.cli import main

sys.exit(main())
