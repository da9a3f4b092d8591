"""`python -m streams.cli ...`: how workers and tests start a `lorastream` command."""

import sys

from streams.cli.main import main

sys.exit(main())
