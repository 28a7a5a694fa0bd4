"""``python -m tl_taskmap ...`` is the ``tl-taskmap`` command (see :mod:`tl_taskmap.cli`)."""

import sys

from tl_taskmap.cli import main

if __name__ == "__main__":
    sys.exit(main())
