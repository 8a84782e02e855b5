"""vlscale.gradcache (being built)."""
