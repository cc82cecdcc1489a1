"""Stage 7's method list: the rows of the results table and the models they decode.

Per stack and P: each search of stage 6 gives its rows (its registry entry reads its
``search.json``), each fixed rule of :data:`comflp.prune.rules.RULES` that fits the stack its
choice (a seeded rule one per seed). A stack's rows prune the model its stages 4-6 worked on
(the dump records it): with both stacks, the decoder's rows prune the encoder-pruned model.
Stage 8 adds the fine-tuned models of one search, stage 9 the structured-pruned ones.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from comflp.errors import InputError
from comflp.expdir import DISTIL_RESULT, HISTORY, STRUCTURE, ExpDir
from comflp.prune.dump import read_dump_info
from comflp.prune.method_list import Method, MethodList
from comflp.prune.rules import RULES, rules_for
from comflp.prune.searches.base import SEARCHES, ModelRef, SearchSettings, read_search
from comflp.settings import option
from comflp.subsets import parse_num_prune


@dataclass(kw_only=True)
class CompareSettings(SearchSettings):
    """Stage 7: which stacks, searches and rules make the table."""

    stack: list[str] = option(
        ["encoder"],
        "the stacks whose rows the table gets (both: the encoder's, then the decoder's)",
        choices=("encoder", "decoder"),
    )
    decoder_num_prune: list[str] = option(
        [], "the decoder's P values when both stacks are in the table (default: --num_prune)"
    )
    random_seeds: int = option(5, "random layer selections per P")
    rules: list[str] = option(
        ["all"], "fixed rules in the table (all: every one that fits the stack and model)"
    )


def search_methods(exp: ExpDir, name: str, p: int, model: ModelRef) -> list[Method]:
    """One search's rows for P (none when stage 6 skipped it, logged)."""
    search = read_search(exp, name, p)
    if "skipped" in search:
        logging.info(f"{name}, P={p}: skipped in stage 6 ({search['skipped']})")
        return []
    return SEARCHES[name]().methods(search, model)


def rule_methods(
    names: list[str], num_layers: int, p: int, random_seeds: int, model: ModelRef
) -> list[Method]:
    """The rows of the fixed rules for P."""
    rows = []
    for name in names:
        rule = RULES[name]
        for seed in range(random_seeds) if rule.seeded else [None]:
            rows.append(
                model.method(
                    name,
                    p,
                    list(rule.choose(num_layers, p, seed or 0)),
                    search_seconds=0.0,
                    evaluations=0,
                    seed=seed,
                    note=rule.note,
                )
            )
    return rows


def stack_methods(s: CompareSettings, stack: str, num_prune: list[str], base: bool) -> list[Method]:
    """One stack's rows: per P its searches and rules (and, with ``base``, the model they
    prune, unpruned)."""
    exp = ExpDir(s.exp_dir).stack(stack)
    info = read_dump_info(exp.dump)
    depth = info["num_layers"]
    where = f"the {depth}-layer {stack} of {info.get('model_dir', s.source)}"
    prunes = parse_num_prune(num_prune, depth, where)
    rules = rules_for(s.rules, stack, bool(info.get("interctc_layers")), s.stack)
    model = ModelRef(s.model_type, info.get("model_dir", str(s.source)), stack)
    methods = [model.method("unpruned", 0, [], note=f"{depth} {stack} layers")] if base else []
    for p in prunes:
        for name in s.search_methods:
            methods += search_methods(exp, name, p, model)
        methods += rule_methods(rules, depth, p, s.random_seeds, model)
    return methods


def list_methods(s: CompareSettings) -> MethodList:
    """Every row of stage 7's table: the unpruned model, then per stack and P the searches of
    stage 6 and the fixed rules. With both stacks the decoder's model is the encoder-pruned
    one (its stage 4 recorded it), whose own row is the encoder search's."""
    if s.stack not in (["encoder"], ["decoder"], ["encoder", "decoder"]):
        raise InputError(
            f"--stack {' '.join(s.stack)}: expected encoder, decoder or 'encoder decoder'"
        )
    methods = MethodList()
    for i, stack in enumerate(s.stack):
        num_prune = (
            s.decoder_num_prune if stack == "decoder" and s.decoder_num_prune else s.num_prune
        )
        methods.methods += stack_methods(s, stack, num_prune, base=i == 0)
    return methods


def finetuned_method(exp: ExpDir, search: str, p: int, ft_dir: Path, model: ModelRef) -> Method:
    """The row of a fine-tuned pruned model: the search's choice, its cost, the epochs (or,
    recovered by distillation, ``<search>+distil`` and its steps and utterances)."""
    chosen = SEARCHES[search]().methods(read_search(exp, search, p), model)[0]
    if (ft_dir / DISTIL_RESULT).is_file():
        record = json.loads((ft_dir / DISTIL_RESULT).read_text())
        name, note = (
            f"{search}+distil",
            f"distilled {record['steps']} steps on {record['filter']['kept']} pseudo-labelled "
            "utterances",
        )
    else:
        epochs = len(json.loads((ft_dir / HISTORY).read_text()))
        name, note = f"{search}+finetune", f"fine-tuned {epochs} epochs"
    return Method(
        name,
        p,
        [],
        str(ft_dir),
        chosen.search_seconds,
        chosen.evaluations,
        note=note,
        original_pruned=chosen.pruned,
        model_type=model.model_type,
        stack=model.stack,
    )


def structured_method(sp_dir: Path, num_layers: int, kept: list[int], model: ModelRef) -> Method:
    """The row of one stage-9 experiment directory: P is the number of layers whose parameters
    the pruning removed in total, round(sparsity x L), so that it sits beside the layer-pruning
    rows of the same size; ``kept``: the encoder layers kept, of ``num_layers``."""
    path = sp_dir / STRUCTURE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (stage 9 has not finished in {sp_dir})")
    structure = json.loads(path.read_text())
    epochs = len(json.loads((sp_dir / HISTORY).read_text()))
    return Method(
        f"structured_l0_sparsity{structure['target_sparsity']:g}",
        round(structure["sparsity"] * num_layers),
        [],
        str(sp_dir),
        note=f"L0 structured pruning, sparsity {structure['sparsity']:.3f}, {epochs} epochs",
        original_pruned=[k for k in range(1, num_layers + 1) if k not in kept],
        model_type=model.model_type,
        stack=model.stack,
    )
