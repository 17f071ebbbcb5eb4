"""agentrl's test suite; a package so that shared helpers import as `tests.<module>` (e.g. tests.model_families)."""
