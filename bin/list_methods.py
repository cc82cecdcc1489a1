#!/usr/bin/env python3
"""Stage 7, step 1: the layers each method prunes for each P (the searches of stage 6, the fixed
rules, random seeds), written to compare/methods.json, the list stage 7 decodes."""

from comflp.cli import main
from comflp.stages.compare import CompareSettings, compare

if __name__ == "__main__":
    main(CompareSettings, compare, __doc__)
