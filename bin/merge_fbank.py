#!/usr/bin/env python3
"""Stage 1, step 2: merge the feature parts of each subset into data/fbank/cuts_<subset>.jsonl.gz
and compute the global CMVN statistics of the training set."""

from comflp.cli import main
from comflp.stages.data import FbankSettings, merge_fbank

if __name__ == "__main__":
    main(FbankSettings, merge_fbank, __doc__)
