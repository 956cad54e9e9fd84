"""`python -m selfextend ...`: the same as the `selfextend` command."""

import sys

from .cli import main

sys.exit(main())
