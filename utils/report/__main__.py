"""python -m utils.report OUTPUT_DIR: tables, intervals, paired comparisons and plots."""

import sys

from utils.report import main

sys.exit(main())
