"""What only a GPU can measure, in one table: ``make bench-gpu``. The code and its options are
in ``teacher.proving.gpu_check`` (``python scripts/gpu_check.py --help``)."""

import sys

from teacher.proving.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
