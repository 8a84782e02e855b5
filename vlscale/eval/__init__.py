"""vlscale.eval (being built)."""
