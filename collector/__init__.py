"""The central collector: MQTT intake with exactly-once storage, fleet view, reports."""

__version__ = "0.1.0"
