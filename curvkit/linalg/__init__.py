"""Linear algebra on curvature operators: eigenpairs, traces, diagonals, spectral densities."""
