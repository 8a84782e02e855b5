"""vlscale.model (being built)."""
