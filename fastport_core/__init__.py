"""fastport_core: the sans-IO protocol core (see docs/architecture.md)."""
