"""GroupNorm-AdaGN-SiLU benchmark: see fastdiff/benchmarks/group_norm.py (also `fastdiff bench --op group_norm`)."""
import sys

from fastdiff.benchmarks.group_norm import main

if __name__ == "__main__":
    sys.exit(main())
