#!/usr/bin/env python3
"""Stage 6: choose the layers to prune with each search of --search_methods (CoMFLP: every
score's coarse top K merged into one fine search; GLP; the oracle), for every P, writing
search/<search>_prune<P>/search.json and the pruned model. Without --exp_dir, CoMFLP's coarse
search of one score file: --matrix M.npy --num_prune P --mode beam --beam_size 10 --top_k 10
--output proposals.json writes the proposals, best first, as a JSON list of
{"layers", "blocks", "score"}."""

from comflp.cli import main
from comflp.stages.search import SearchSettings, search

if __name__ == "__main__":
    main(SearchSettings, search, __doc__)
