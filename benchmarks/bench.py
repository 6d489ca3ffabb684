"""Performance benchmark of LEMoE against ROME, MEMIT, GRACE and FT (see lemoe_easyedit.bench).

    python benchmarks/bench.py --out bench-results
    python benchmarks/bench.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lemoe_easyedit.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
