"""Stage 3 (train the baseline), stage 8 (fine-tune a pruned model) and stage 9 (structured
pruning): settings and the calls into the trainers."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from comflp.adapters.base import (
    MODEL_TYPES,
    DecoderModel,
    ModelSettings,
    PrunableModel,
    load_prunable,
)
from comflp.adapters.native import NativeModel
from comflp.adapters.whisper import WhisperAdapter
from comflp.asr.checkpoint import (
    copy_assets,
    load_checkpoint,
    load_experiment_config,
    load_model,
)
from comflp.asr.config import ExperimentConfig, load_config
from comflp.asr.data import ctc_feasible, load_cuts
from comflp.asr.features import load_cmvn
from comflp.asr.tokenizer import Tokenizer
from comflp.errors import InputError, Stopped
from comflp.expdir import CMVN, DISTIL_RESULT, METHOD_LISTS, MODEL, STRUCTURE, TOKENIZER, ExpDir
from comflp.prune.dump import read_dump_info
from comflp.prune.method_list import MethodList
from comflp.prune.methods import finetuned_method, structured_method
from comflp.prune.searches.base import SEARCHES, ModelRef
from comflp.settings import REQUIRED, option
from comflp.structured.config import load_structured_config
from comflp.structured.trainer import structured_prune
from comflp.structured.whisper_train import load_whisper_structured_config, structured_whisper
from comflp.subsets import parse_num_prune
from comflp.train.distil import Prepared, distil_stage, has_distil_section, prepare
from comflp.train.distributed import Dist, finish_distributed, init_distributed
from comflp.train.trainer import AdapterTrainer, train
from comflp.utils import resolve_device


def parse_overrides(items: list[str]) -> dict:
    """``--set SECTION.KEY=VALUE`` options as ``{"SECTION.KEY": value}`` (values read as YAML,
    but a number stays a number: YAML 1.1 reads ``1e-12`` as a string)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set {item}: expected SECTION.KEY=VALUE, e.g. model.num_layers=6")
        out[key] = yaml.safe_load(value)
        if isinstance(out[key], str):
            out[key] = _number(out[key])
    return out


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


@dataclass(kw_only=True)
class TrainSettings:
    """Stage 3 (a config from scratch) and stage 8 (``--init_model``: a pruned model)."""

    train_config: Path = option(
        REQUIRED, "YAML with model: and train: sections (stage 8: train: only)"
    )
    exp_dir: Path = option(REQUIRED, "the training's experiment directory")
    train_cuts: Path = option(REQUIRED, "training cuts (stage 1)")
    dev_cuts: Path = option(REQUIRED, "dev cuts (stage 1)")
    lang_dir: Path | None = option(None, "tokenizer directory of stage 2 (stage 3)")
    cmvn: Path | None = option(None, "cmvn.json of stage 1 (stage 3)")
    init_model: Path | None = option(None, "initialise from this model (stage 8: the pruned one)")
    model_type: str = option(
        "native",
        "the library of --init_model (not native: through its adapter)",
        choices=lambda: MODEL_TYPES.names(),
    )
    resume: bool = option(True, "continue from the latest checkpoint")
    stop_after_steps: int = option(0, "checkpoint and stop after this many steps (time slices)")
    set: list[str] = option([], "config overrides SECTION.KEY=VALUE, e.g. train.num_epochs=2")
    device: str = option("auto", "auto | cpu | cuda")
    amp: bool = option(False, "bf16 autocast on GPU")
    nthreads: int = option(0, "torch CPU threads (0: the node's cores shared out among processes)")


def train_stage(s: TrainSettings) -> None:
    """Train or fine-tune; :class:`Stopped` when it checkpointed before the end."""
    device = resolve_device(s.device)
    if s.init_model is not None and s.model_type != NativeModel.model_type:
        done = finetune_adapter(s, device)
    else:
        info, device = init_distributed(device, bool(s.nthreads))
        try:
            done = train_native(s, info, device)
        finally:
            finish_distributed(info)
    if not done:
        raise Stopped


def finetune_adapter(s: TrainSettings, device: str) -> bool:
    """Stage 8 for a model of another library: fine-tune --init_model through its adapter."""
    if Dist.from_env().world_size > 1:
        raise InputError(f"--model_type {s.model_type}: fine-tuning runs in one process only")
    adapter = load_prunable(s.model_type, s.init_model)
    cfg = load_config(s.train_config, parse_overrides(s.set))
    max_seconds = cfg.train.max_utterance_duration
    train_cuts = load_cuts(s.train_cuts).filter(lambda c: c.duration <= max_seconds).to_eager()
    dev_cuts = load_cuts(s.dev_cuts)
    logging.info(f"train: {len(train_cuts)} utterances; dev: {len(dev_cuts)}")
    s.exp_dir.mkdir(parents=True, exist_ok=True)
    trainer = AdapterTrainer(adapter, cfg, s.exp_dir, train_cuts, dev_cuts, device)
    trainer.restore(s.resume, None)
    return trainer.run(s.stop_after_steps)


def _experiment_assets(s: TrainSettings, info: Dist) -> None:
    """A new experiment directory gets its own tokenizer and CMVN copies; an old one keeps its."""
    if not info.is_main or (s.exp_dir / TOKENIZER).is_file():
        return
    if s.init_model is not None:
        copy_assets(s.init_model, s.init_model / CMVN, s.exp_dir)
    elif s.lang_dir is None or s.cmvn is None:
        raise InputError("--lang_dir and --cmvn are needed unless --init_model is given")
    else:
        copy_assets(s.lang_dir, s.cmvn, s.exp_dir)


def train_native(s: TrainSettings, info: Dist, device: str) -> bool:
    """Stage 3, or stage 8 of a native model (its architecture, this config's training)."""
    cfg = load_config(s.train_config, parse_overrides(s.set))
    init_state = None
    if s.init_model is not None:
        cfg.model = load_experiment_config(s.init_model).model
        init_state = load_checkpoint(s.init_model / MODEL)["model"]
    _experiment_assets(s, info)
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    tokenizer = Tokenizer(s.exp_dir / TOKENIZER)
    cfg.model.vocab_size = tokenizer.vocab_size
    cfg.validate(str(s.train_config))
    upsample = cfg.model.ctc_upsample
    train_cuts = ctc_feasible(load_cuts(s.train_cuts), tokenizer, "train", upsample)
    max_seconds = cfg.train.max_utterance_duration
    train_cuts = train_cuts.filter(lambda c: c.duration <= max_seconds).to_eager()
    dev_cuts = ctc_feasible(load_cuts(s.dev_cuts), tokenizer, "dev", upsample)
    logging.info(f"train: {len(train_cuts)} utterances; dev: {len(dev_cuts)}")
    return train(
        cfg,
        s.exp_dir,
        train_cuts,
        dev_cuts,
        tokenizer,
        load_cmvn(s.exp_dir / CMVN),
        device=device,
        resume=s.resume,
        init_state=init_state,
        stop_after_steps=s.stop_after_steps,
        amp=s.amp,
        dist_info=info,
    )


@dataclass(kw_only=True)
class StructuredSettings(ModelSettings):
    """Stage 9: L0 structured pruning (Jiang et al. 2023) of a trained native model (its
    encoder) or a Whisper model (both stacks), for each target sparsity, into
    exp/structured/sparsity<t>/; then their rows of the table."""

    sp_config: Path = option(
        Path("conf/structured.yaml"), "YAML with structured: and train: (Whisper: + distil:)"
    )
    teacher: Path | None = option(
        None, "native: the model to distil from (default: the pruned one)"
    )
    train_cuts: Path = option(REQUIRED, "training cuts")
    dev_cuts: Path = option(REQUIRED, "dev cuts")
    sp_target_sparsity: list[float] = option(
        [0.5], "fractions of the prunable layers' parameters to remove, one model each"
    )
    resume: bool = option(True, "continue from the latest checkpoint")
    stop_after_steps: int = option(0, "native: checkpoint and stop after this many steps")
    set: list[str] = option([], "config overrides SECTION.KEY=VALUE")


def structured_stage(s: StructuredSettings) -> None:
    if Dist.from_env().world_size > 1:
        raise InputError("structured pruning runs in one process (no torchrun)")
    exp = ExpDir(s.exp_dir)
    native = s.model_type == "native"
    teacher = None if native else s.load_model()
    if teacher is not None and not isinstance(teacher, WhisperAdapter):
        raise InputError(f"--model_type {s.model_type}: stage 9 prunes native and Whisper models")
    depth = load_experiment_config(s.source).model.num_layers if native else teacher.num_layers
    model = ModelRef(s.model_type, str(s.source), s.stack)
    methods = MethodList()
    for target in s.sp_target_sparsity:
        sp_dir = exp.structured(target)
        if native:
            structured_prune_one(s, target, sp_dir)
            cfg = load_experiment_config(sp_dir).model
            kept = cfg.kept_layers or list(range(1, cfg.num_layers + 1))
        else:
            kept = structured_whisper_one(s, teacher, target, sp_dir)
        methods.add(structured_method(sp_dir, depth, kept, model))
    methods.save(exp.compare / METHOD_LISTS["structured"])


def structured_whisper_one(
    s: StructuredSettings, teacher: WhisperAdapter, target: float, out_dir: Path
) -> list[int]:
    """One target sparsity of a Whisper model into ``out_dir`` (skipped when done); the
    encoder layers kept."""
    if s.resume and (out_dir / STRUCTURE).is_file():
        logging.info(f"{out_dir}: pruned already ({STRUCTURE}); skipping")
    else:
        overrides = {**parse_overrides(s.set), "structured.target_sparsity": target}
        config = load_whisper_structured_config(s.sp_config, overrides)
        logging.info(
            f"structured pruning of {s.source} (both stacks) to sparsity {target} "
            f"(gates: {', '.join(config[0].gates)})"
        )
        student = teacher._with(copy.deepcopy(teacher.hf))
        structured_whisper(
            student,
            teacher,
            load_cuts(s.train_cuts),
            load_cuts(s.dev_cuts),
            config,
            out_dir,
            s.resume,
            f"{s.sp_config}: structured",
        )
    return json.loads((out_dir / STRUCTURE).read_text())["kept_layers"]["encoder"]


def structured_prune_one(s: StructuredSettings, target: float, out_dir: Path) -> None:
    """One target sparsity into ``out_dir`` (:class:`Stopped` when it checkpointed early)."""
    source = s.source
    overrides = {**parse_overrides(s.set), "structured.target_sparsity": target}
    sp, train_cfg = load_structured_config(s.sp_config, overrides)
    model_cfg = load_experiment_config(source).model
    sp.validate(model_cfg, f"{s.sp_config}: structured")
    cfg = ExperimentConfig(model=model_cfg, train=train_cfg)
    if not (out_dir / TOKENIZER).is_file():
        copy_assets(source, source / CMVN, out_dir)
    tokenizer = Tokenizer(out_dir / TOKENIZER)
    upsample = model_cfg.ctc_upsample
    train_cuts = ctc_feasible(load_cuts(s.train_cuts), tokenizer, "train", upsample)
    max_seconds = train_cfg.max_utterance_duration
    train_cuts = train_cuts.filter(lambda c: c.duration <= max_seconds).to_eager()
    dev_cuts = ctc_feasible(load_cuts(s.dev_cuts), tokenizer, "dev", upsample)
    logging.info(
        f"structured pruning of {source} to sparsity {sp.target_sparsity} "
        f"(gates: {', '.join(sp.gates)}); train: {len(train_cuts)} utterances"
    )
    done = structured_prune(
        cfg,
        sp,
        out_dir,
        train_cuts,
        dev_cuts,
        tokenizer,
        load_cmvn(out_dir / CMVN),
        load_checkpoint(source / MODEL)["model"],
        load_model(s.teacher or source),
        device=resolve_device(s.device),
        resume=s.resume,
        stop_after_steps=s.stop_after_steps,
    )
    if not done:
        raise Stopped


@dataclass(kw_only=True)
class FinetuneSettings(ModelSettings):
    """Stage 8: fine-tune one search's pruned model for every P, then list their rows."""

    finetune_config: Path = option(Path("conf/finetune.yaml"), "YAML with a train: section")
    finetune_search: str = option(
        "comflp", "the search whose choice is fine-tuned", choices=lambda: SEARCHES.names()
    )
    num_prune: list[str] = option(["6"], "the P values (as stage 6)")
    train_cuts: Path = option(REQUIRED, "training cuts")
    dev_cuts: Path = option(REQUIRED, "dev cuts")
    resume: bool = option(True, "continue from the latest checkpoint")
    set: list[str] = option([], "config overrides SECTION.KEY=VALUE")
    amp: bool = option(False, "bf16 autocast on GPU")
    nthreads: int = option(0, "torch CPU threads (0: the node's cores shared out among processes)")


def distil_one(
    s: FinetuneSettings, teacher: PrunableModel, prepared: Prepared, pruned: Path, out_dir: Path
) -> None:
    """Stage 8 with a teacher (a ``distil:`` section): Distil-Whisper's recovery of ``pruned``
    from the unpruned model into ``out_dir``."""
    options = {k: getattr(s, k) for k in MODEL_TYPES[s.model_type].load_options}
    student = load_prunable(s.model_type, pruned, **options).to(teacher.device)
    distil_stage(student, teacher, prepared, out_dir)


def finetune_stage(s: FinetuneSettings) -> None:
    """Fine-tune ``exp/search/<search>_prune<P>/pruned`` into ``exp/finetune/<search>_prune<P>``
    for each P, then write compare/methods_finetuned.json."""
    root = ExpDir(s.exp_dir)
    exp = root.stack(s.stack)
    depth = read_dump_info(exp.dump)["num_layers"]
    prunes = parse_num_prune(s.num_prune, depth, f"the {depth}-layer {s.stack}")
    model = ModelRef(s.model_type, str(s.source), s.stack)
    methods = MethodList()
    distil = has_distil_section(s.finetune_config)
    teacher, prepared = (s.load_model() if distil else None), None
    if distil and not isinstance(teacher, DecoderModel):
        raise InputError(f"{s.finetune_config}: distillation needs a model with a decoder")
    for p in prunes:
        ft_dir = exp.finetune(s.finetune_search, p)
        if distil:
            if s.resume and (ft_dir / DISTIL_RESULT).is_file():
                logging.info(f"{ft_dir}: recovered already ({DISTIL_RESULT}); skipping")
            else:
                prepared = prepared or prepare(
                    teacher,
                    load_cuts(s.train_cuts),
                    load_cuts(s.dev_cuts),
                    s.finetune_config,
                    parse_overrides(s.set),
                )
                distil_one(s, teacher, prepared, exp.pruned_model(s.finetune_search, p), ft_dir)
            methods.add(finetuned_method(exp, s.finetune_search, p, ft_dir, model))
            continue
        train_stage(
            TrainSettings(
                train_config=s.finetune_config,
                exp_dir=ft_dir,
                train_cuts=s.train_cuts,
                dev_cuts=s.dev_cuts,
                init_model=exp.pruned_model(s.finetune_search, p),
                model_type=s.model_type,
                resume=s.resume,
                set=s.set,
                device=s.device,
                amp=s.amp,
                nthreads=s.nthreads,
            )
        )
        methods.add(finetuned_method(exp, s.finetune_search, p, ft_dir, model))
    if Dist.from_env().is_main:
        methods.save(root.compare / METHOD_LISTS["finetune"])
