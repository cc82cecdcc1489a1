#!/usr/bin/env python3
"""Stage 9: L0 structured pruning (Jiang et al. 2023) of a trained native model to each target
sparsity, physically pruned, and their rows of the results table (compare/methods_structured.json)."""

from comflp.cli import main
from comflp.stages.train import StructuredSettings, structured_stage

if __name__ == "__main__":
    main(StructuredSettings, structured_stage, __doc__)
