#!/usr/bin/env python3
"""Stage 4, step 2: join the layer dumps of a job array's parts into dump/."""

from comflp.cli import main
from comflp.stages.dump import MergeDumpSettings, merge_dump

if __name__ == "__main__":
    main(MergeDumpSettings, merge_dump, __doc__)
