"""vlscale.techniques (being built)."""
