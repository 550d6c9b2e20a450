"""The feedback edge daemon: devices -> durable local store -> MQTT."""

__all__ = ["__version__"]

__version__ = "0.1.0"
