"""Linear algebra on curvature operators: eigenpairs, traces, spectral densities."""
