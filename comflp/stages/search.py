"""Stage 6: run the searches of ``--search_methods`` for every P on the chosen stack, each
writing search/<search>_prune<P>/search.json and the pruned model (pruned/, in the model's own
format). Without an experiment, the coarse search of one score file (``--matrix``) alone."""

from __future__ import annotations

import logging

from comflp.asr.data import EVAL_ORDER, load_eval_batches
from comflp.errors import InputError
from comflp.expdir import PRUNED, SEARCH_RESULT, ExpDir
from comflp.prune.metric_search import SearchResult
from comflp.prune.scores.base import read_score_file
from comflp.prune.search import coarse_search, format_proposals
from comflp.prune.searches.base import SEARCHES, SearchContext, SearchSettings
from comflp.prune.stacks import LayerStack, stack_of
from comflp.subsets import parse_num_prune
from comflp.utils import atomic_write_json


def search(s: SearchSettings) -> None:
    if s.exp_dir is None or s.dev_cuts is None:
        if s.exp_dir is not None or s.dev_cuts is not None:
            raise InputError("a search with a model needs both --exp_dir and --dev_cuts")
        return coarse_only(s)
    model = s.load_model()
    stack = stack_of(model, s.stack)
    prunes = parse_num_prune(
        s.num_prune, stack.num_layers, f"the {stack.num_layers}-layer {s.stack}"
    )
    batches = load_eval_batches(model, s.dev_cuts, s.max_duration, s.fine_num_utts, s.seed)
    exp = ExpDir(s.exp_dir).stack(s.stack)
    for name in s.search_methods:
        results = SEARCHES[name]().run(SearchContext(s, stack, batches, exp), prunes)
        for p, result in results.items():
            write_result(exp, name, p, result, stack, s)


def write_result(
    exp: ExpDir, name: str, p: int, result: SearchResult | str, stack: LayerStack, s: SearchSettings
) -> None:
    """search.json and the chosen pruned model of one search and P (or why it was skipped)."""
    out_dir = exp.search(name, p)
    if isinstance(result, str):
        atomic_write_json(
            out_dir / SEARCH_RESULT, {"method": name, "num_prune": p, "skipped": result}
        )
        logging.info(f"{name}, P={p}: skipped ({result})")
        return
    pruned_dir = out_dir / PRUNED
    stack.prune(result.best_layers).save(
        pruned_dir,
        {
            "pruned_layers": list(result.best_layers),
            "stack": stack.name,
            "source": str(stack.model.source),
        },
    )
    atomic_write_json(
        out_dir / SEARCH_RESULT,
        {
            **result.to_dict(),
            "stack": stack.name,
            "num_utts": s.fine_num_utts,
            "dev_cuts": str(s.dev_cuts),
            "seed": s.seed,
            "max_duration": s.max_duration,
            "batch_order": EVAL_ORDER,
            "model_type": stack.model.model_type,
            "model_dir": str(stack.model.source),
            "pruned_dir": str(pruned_dir),
        },
    )
    logging.info(
        f"{name}, P={p}: layers {list(result.best_layers)} ({result.metric} "
        f"{result.best_metric:.3f}) after {len(result.candidates)} evaluations, "
        f"{result.seconds:.1f} s in all; pruned model in {pruned_dir}"
    )


def coarse_only(s: SearchSettings) -> None:
    """CoMFLP's coarse search on one score file, proposals written to ``--output``."""
    if s.matrix is None or s.output is None:
        raise InputError(
            "without --exp_dir and --dev_cuts only the coarse search runs: it needs --matrix "
            "and --output"
        )
    if not s.matrix.is_file():
        raise InputError(f"--matrix {s.matrix}: no such file")
    try:
        score = read_score_file(s.matrix)
    except ValueError as e:
        raise InputError(f"--matrix {e}") from None
    depth = score.num_layers
    prunes = parse_num_prune(s.num_prune, depth, f"the {depth}-layer scores {s.matrix}")
    if len(prunes) > 1:
        raise InputError(f"--num_prune: the coarse search alone takes one value, got {prunes}")
    try:
        proposals = coarse_search(
            score.scorer(s.coarse_aggregation),
            prunes[0],
            s.search_mode,
            s.beam_size,
            s.top_k,
            s.max_exhaustive,
        )
    except ValueError as e:
        raise InputError(f"--search_mode {s.search_mode}: {e}") from None
    print(format_proposals(proposals))
    atomic_write_json(s.output, [p.to_dict() for p in proposals])
    logging.info(
        f"wrote {s.output}: {len(proposals)} proposals, best score {proposals[0].score:.6f}"
    )
