"""vlscale.train (being built)."""
