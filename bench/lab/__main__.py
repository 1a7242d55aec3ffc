"""`python -m bench.lab`: see bench/lab/run.py."""

import sys

from bench.lab.run import main

sys.exit(main())
