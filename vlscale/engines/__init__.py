"""vlscale.engines (being built)."""
