"""The HTTP side of the node: dashboard, REST API, /metrics, /healthz and /readyz (docs/operations.md)."""
