"""Moved to :mod:`tl_taskmap.report.layer_map`; this import path keeps working and gives the same objects."""

from tl_taskmap.report import layer_map as _moved

globals().update({name: value for name, value in vars(_moved).items() if not name.startswith("__") or name == "__all__"})
