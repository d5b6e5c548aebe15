"""`python -m serving.client`: the command line (serving/client/cli.py)."""

import sys

from serving.client.cli import main

sys.exit(main())
