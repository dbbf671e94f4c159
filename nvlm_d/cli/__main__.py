"""`python -m nvlm_d.cli`: the `nvlm-d` command."""

import sys

from . import main

sys.exit(main())
