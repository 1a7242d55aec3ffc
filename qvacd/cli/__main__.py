"""`python -m qvacd.cli ...`: the same as the `qvacd` console script.

Tests, benches and the lab start daemons this way. `main` lives in the package, which
this module imports like any other, so there is one CliError class however the CLI runs.
"""

import sys

from qvacd.cli import main

sys.exit(main())
