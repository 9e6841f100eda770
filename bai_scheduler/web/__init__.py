"""The service's web layer: one module per area, each exporting ``default_handlers``."""
