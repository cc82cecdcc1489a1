#!/usr/bin/env python3
"""Stage 1, step 1: 80-dim fbank (lhotse, lilcom storage) for part --part of --num_parts of each
subset, as a job array; bin/merge_fbank.py joins the parts. Utterances too short for the x4
subsampling or longer than --max_utt_duration are dropped with a logged count; with
--speed_perturb true the training set gets 0.9x and 1.1x speed copies first."""

from comflp.cli import main
from comflp.stages.data import FbankSettings, fbank_part

if __name__ == "__main__":
    main(FbankSettings, fbank_part, __doc__)
