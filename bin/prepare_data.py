#!/usr/bin/env python3
"""Stage 0: read a corpus (LibriSpeech layout, AISHELL-1 layout or Kaldi data directories) with
lhotse's preparation and write data/manifests/cuts_<subset>.jsonl.gz, one cut per utterance.
LibriSpeech's train-960 is one cut set of train-clean-100, train-clean-360 and train-other-500.
With --download true, lhotse first downloads and extracts the corpus into --corpus_dir, which
must then end with /LibriSpeech or /aishell; parts lhotse completed before are not fetched again."""

from comflp.cli import main
from comflp.stages.data import PrepareSettings, prepare

if __name__ == "__main__":
    main(PrepareSettings, prepare, __doc__)
