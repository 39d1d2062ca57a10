"""The networks: one file per model (config dataclass, modules, sanitize, loader)."""
