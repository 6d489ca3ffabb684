"""Performance benchmark of LEMoE against ROME, MEMIT, GRACE and FT (see lemoe_bench).

    python benchmarks/bench.py --out bench-results
    python benchmarks/bench.py --help
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The harness (benchmarks/lemoe_bench) and this checkout's package, installed or not.
sys.path[:0] = [str(HERE), str(HERE.parent)]

from lemoe_bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
