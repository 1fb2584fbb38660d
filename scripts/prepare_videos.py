#!/usr/bin/env python
"""Re-encode a dataset for fast random access: a thin wrapper of ``python -m evl.prepare``.

Usage: scripts/prepare_videos.py --list train.txt --data_root videos/ --output videos_320/ [--short_side 320]
(see ``python -m evl.prepare --help``).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from evl.prepare import main  # noqa: E402

if __name__ == "__main__":
    from evl.cli import run_program

    run_program(main)
