"""curvkit's command line (``curvkit``), installed as ``curvkit.cli``."""
