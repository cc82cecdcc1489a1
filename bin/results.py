#!/usr/bin/env python3
"""Stage 7, step 3 (and 8, 9): merge the decoding parts, score every method, write RESULTS.md,
compare/results.json and the plots."""

from comflp.cli import main
from comflp.stages.compare import ResultsSettings, results

if __name__ == "__main__":
    main(ResultsSettings, results, __doc__)
