"""``python -m sinkserve ...``: the ``sinkserve`` command without its console script."""

import sys

from sinkserve.cli import main

sys.exit(main())
