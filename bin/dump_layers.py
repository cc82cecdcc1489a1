#!/usr/bin/env python3
"""Stage 4, step 1: dump the stack's input and every layer's output for part --part of
--num_parts of a calibration subset (kaldiio ark/scp) into dump/parts/<part>/; bin/merge_dump.py
joins the parts."""

from comflp.cli import main
from comflp.stages.dump import DumpSettings, dump_part

if __name__ == "__main__":
    main(DumpSettings, dump_part, __doc__)
