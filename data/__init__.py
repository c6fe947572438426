"""Files bundled with curvkit: the 8x8 digits dataset and trained checkpoints (see README.md)."""
