#!/usr/bin/env python3
"""Stage 8: fine-tune the pruned model that --finetune_search chose, for every P, and list the
fine-tuned models as rows of the results table (compare/methods_finetuned.json)."""

from comflp.cli import main
from comflp.stages.train import FinetuneSettings, finetune_stage

if __name__ == "__main__":
    main(FinetuneSettings, finetune_stage, __doc__)
