"""vlscale.loss (being built)."""
