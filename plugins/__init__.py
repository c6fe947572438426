"""curvkit's built-in estimators, each an ordinary plugin on curvkit's hooks.

Installed as ``curvkit.plugins``. These modules use only curvkit's public API,
exactly as a third-party plugin would.
"""
