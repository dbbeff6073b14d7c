"""GroupNorm-AdaGN-SiLU benchmark: see fastdiff/benchmarks/group_norm.py (also `fastdiff bench --op group_norm`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from fastdiff.benchmarks.group_norm import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
