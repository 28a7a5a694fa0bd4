"""The error a user can fix: a configuration, task file or option that cannot run.

The command line turns it into one ``error:`` line and exit code 2 (no traceback unless ``--debug``).

Example:
    >>> str(ConfigError("k must be in (0, 1], got 2"))
    'k must be in (0, 1], got 2'
"""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A :class:`~tl_taskmap.report.config.MapConfig` (or task source) that cannot run; raised before any model is loaded."""
