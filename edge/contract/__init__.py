"""The contract between the edge daemon and the central collector, in one place.

Both sides import it; `collector/` imports nothing else from `edge/`.

- `topics`: every MQTT topic of ../shared/mqtt-contract.md and the filters
  the collector subscribes with;
- `payloads`: the JSON Schemas of the payloads (shipped in `schemas/`) and
  the event schema's version name;
- `timefmt`: the wire form of times (`format_wall`), the range every wall
  time in a payload is within (`WALL_MIN_MS`..`WALL_MAX_MS`), and the
  weekday, time of day and time zone syntax both config files use;
- `broker`: the `[broker]` table both config files share, and how a paho
  client gets its credentials and TLS from it;
- `toml`: reading one TOML table with errors that name key, value and what
  is allowed (`ConfigError`, `Table`);
- `ids`: the grammar of every identifier: site, edge, device and desk ids
  (topic levels), operator and doctor ids, device serials.
"""
