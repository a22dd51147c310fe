"""The hpfeeds broker: config → server → connections → router, with pluggable
authenticators, a metrics exporter and an optional NATS backplane."""
