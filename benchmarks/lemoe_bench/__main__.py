"""``python -m lemoe_bench`` (with ``benchmarks/`` on ``sys.path``): the bench, or one worker."""

import sys

from .cli import main

sys.exit(main())
