"""vlscale.data (being built)."""
