"""Device drivers: a pure protocol core and thin transports per device kind."""
