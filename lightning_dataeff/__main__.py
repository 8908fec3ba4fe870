"""``python -m lightning_dataeff``: the ``dataeff`` command line."""

import sys

from lightning_dataeff.cli import main

sys.exit(main())
