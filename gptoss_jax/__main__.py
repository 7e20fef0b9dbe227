"""`python -m gptoss_jax ...` is the `gptoss-jax` command."""

import sys

from .cli import main

sys.exit(main())
