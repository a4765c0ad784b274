"""``python -m checkpoints_convert SRC DST [...]``: see :mod:`checkpoints_convert.cli`."""

import sys

from checkpoints_convert.cli import main

sys.exit(main())
