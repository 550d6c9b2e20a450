"""Every MQTT topic of the contract (../shared/mqtt-contract.md, "Topics").

An edge's topics hang below its root, `feedback/v1/{site}/{edge}`; the
helpers take that root (`topic_root(site, edge)`), so the daemon computes it
once.  Passing "+" for the root's parts (`ANY_ROOT`), a device or a command
name gives the MQTT filter for all of them.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ALL_TOPICS",
    "ANY_ROOT",
    "COLLECTOR_STATE_TOPIC",
    "PREFIX",
    "SIDE_MESSAGES",
    "ack_topic",
    "cmd_name",
    "cmd_topic",
    "devices_topic",
    "event_topic",
    "health_topic",
    "result_topic",
    "shared_events_filter",
    "split_topic",
    "status_topic",
    "timesync_topic",
    "topic_root",
]

PREFIX: Final = "feedback/v1"
# Every topic of the contract, as a filter.
ALL_TOPICS: Final = f"{PREFIX}/#"
_COLLECTOR: Final = "collector"  # the collectors' own level, in place of a site
# The collector's retained presence, read by edges in `collector` delivery
# mode and written by the collector.
COLLECTOR_STATE_TOPIC: Final = f"{PREFIX}/{_COLLECTOR}/state"
# The per-edge messages other than events that the collector stores.
SIDE_MESSAGES: Final = ("status", "devices", "health", "timesync")


def topic_root(site: str, edge: str) -> str:
    """`feedback/v1/{site}/{edge}`: below it are all of one edge's topics."""
    return f"{PREFIX}/{site}/{edge}"


# Every edge's root, as a filter.
ANY_ROOT: Final = topic_root("+", "+")


def event_topic(root: str, device: str) -> str:
    """One event per message, from `device` ("+": the filter for every device)."""
    return f"{root}/event/{device}"


def status_topic(root: str) -> str:
    """Retained online/offline of the edge (offline is its will)."""
    return f"{root}/status"


def devices_topic(root: str) -> str:
    """The retained device inventory."""
    return f"{root}/devices"


def health_topic(root: str) -> str:
    """Health every 60 s (QoS 0)."""
    return f"{root}/health"


def timesync_topic(root: str) -> str:
    """The clock anchor, when the edge's clock becomes synchronised."""
    return f"{root}/timesync"


def ack_topic(root: str) -> str:
    """The collector's retained ack watermark for this edge."""
    return f"{root}/ack"


def cmd_topic(root: str, name: str) -> str:
    """A command to the edge ("+": the filter the edge subscribes to)."""
    return f"{root}/cmd/{name}"


def result_topic(command_topic: str) -> str:
    """Where the edge answers a command that came on `command_topic`."""
    return f"{command_topic}/result"


def cmd_name(root: str, topic: str) -> str | None:
    """The command's name if `topic` is a command below `root`, else None."""
    prefix = cmd_topic(root, "")
    return topic[len(prefix):] if topic.startswith(prefix) else None


def shared_events_filter(group: str) -> str:
    """Every edge's events, shared among the collectors of `group`."""
    return f"$share/{group}/{event_topic(ANY_ROOT, '+')}"


def split_topic(topic: str) -> tuple[str, str, list[str]] | None:
    """(site, edge, the levels below the root) of an edge's topic.

    None for topics outside the contract and for the collectors' own.
    """
    parts = topic.split("/")
    if len(parts) < 5 or parts[:2] != PREFIX.split("/") or parts[2] == _COLLECTOR:
        return None
    return parts[2], parts[3], parts[4:]
