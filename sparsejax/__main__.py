"""``python -m sparsejax ...`` is the ``sparsejax`` command."""

import sys

from sparsejax.cli import main

sys.exit(main())
