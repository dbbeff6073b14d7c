"""Results -> markdown table + PNG plots, or --compare OLD.json: see fastdiff/benchmarks/report.py."""
import sys

from fastdiff.benchmarks.report import main

if __name__ == "__main__":
    sys.exit(main())
