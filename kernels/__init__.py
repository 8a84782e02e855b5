"""Triton kernels of vlscale (installed as ``vlscale.kernels``)."""
