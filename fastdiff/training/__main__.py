"""``python -m fastdiff.training ...`` (and ``torchrun ... -m fastdiff.training ...``)."""
import sys

from fastdiff.training.cli import train_main

sys.exit(train_main())
