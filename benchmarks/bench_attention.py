"""Attention benchmark: see fastdiff/benchmarks/attention.py (also `fastdiff bench --op attention`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from fastdiff.benchmarks.attention import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
