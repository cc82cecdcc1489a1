#!/usr/bin/env python3
"""Stage 3: train the baseline (Transformer or Conformer CTC, intermediate CTC, stochastic depth)
into an experiment directory; with --init_model, fine-tune a model (a Hugging Face or ESPnet2
model through its adapter, written back in its own format). Under torchrun, one process per GPU or CPU slot (native models)."""

from comflp.cli import main
from comflp.stages.train import TrainSettings, train_stage

if __name__ == "__main__":
    main(TrainSettings, train_stage, __doc__)
