"""Numerical kernels of the decode path, each with a plain reference twin it is tested against."""
