"""Sampler-step and sampling-loop benchmark: see fastdiff/benchmarks/sampler.py (also `fastdiff bench --op sampler_step`)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from fastdiff.benchmarks.sampler import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
