"""The VM tier: Debian's kernel under QEMU with USB gadgets on dummy_hcd."""
