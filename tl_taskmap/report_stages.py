"""Moved to :mod:`tl_taskmap.report.stages`; this import path keeps working and gives the same objects."""

from tl_taskmap.report import stages as _moved

globals().update({name: value for name, value in vars(_moved).items() if not name.startswith("__") or name == "__all__"})
