"""Every ``bin/`` entry point on bad input, through its command line: one ERROR line naming
what is wrong, exit status 1, no traceback, and nothing written where its output would go."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import PYTHON, REPO, run_cmd

# entry point and arguments ("OUT": where it would write), and what its one line must say
CASES = {
    "finetune.py": (
        "--exp_dir OUT --num_prune 1 --train_cuts nope.jsonl.gz --dev_cuts nope.jsonl.gz",
        "OUT/dump/info.json: not found (run stage 4",
    ),
    "compute_fbank.py": (
        "--manifest_dir nope --output_dir OUT --subsets dev --train_set dev",
        "nope/cuts_dev.jsonl.gz: manifest not found",
    ),
    "merge_fbank.py": (
        "--output_dir OUT --subsets dev --train_set dev --num_parts 2",
        "OUT/parts/cuts_dev.1.jsonl.gz: missing (run bin/compute_fbank.py for parts 1..2)",
    ),
    "train_tokenizer.py": (
        "--cuts nope.jsonl.gz --output_dir OUT --token_type bpe --nbpe 10",
        "nope.jsonl.gz: manifest not found",
    ),
    "results.py": (
        "--exp_dir OUT --eval_sets dev",
        "OUT/compare/methods.json: method list not found",
    ),
    "search_quality_summary.py": (
        "--studies nope --output OUT",
        "--studies nope: expected LABEL=DIR with DIR/quality.json",
    ),
    "decoder_scores_summary.py": (
        "--studies nope --output OUT",
        "--studies nope: expected LABEL=DIR with DIR/decoder_scores.json",
    ),
    "decoder_scores.py": (
        "--exp_dir OUT --output_dir OUT --stack encoder",
        "--stack encoder: the decoder study needs --stack decoder",
    ),
    "first_order_check.py": (
        "--exp_dir OUT --output OUT/check.md --stack decoder",
        "--stack decoder: the first-order check reads an encoder stack",
    ),
    "export.py": ("--model_dir nope --out_dir OUT", "--model_dir nope: not a directory"),
    "dump_layers.py": (
        "--exp_dir OUT --cuts nope.jsonl.gz --calib_num_utts 1",
        "--calib_num_utts: must be >= 2, got 1",
    ),
    "check_options.py": (
        "--model_type native --scores dc --search_methods comflp --rules all --fine_metric bleu "
        "--search_mode beam --coarse_aggregation mean --decoding_method ctc_greedy_search "
        "--ct2_quantization auto",
        "--fine_metric bleu: unknown bleu; choose from cer, wer, loss",
    ),
}
PREFLIGHT = (
    "--model_type native --scores dc --search_methods comflp --rules all --fine_metric cer "
    "--search_mode beam --coarse_aggregation mean --decoding_method ctc_greedy_search "
    "--ct2_quantization auto"
)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--fine_rules", "drop_top nope"],
            "--fine_rules drop_top nope: unknown nope; choose from",
        ),
        (["--refine", "sometimes"], "--refine sometimes: unknown sometimes; choose from auto"),
        (["--fine_rules", ""], None),
    ],
)
def test_check_options_covers_the_fine_search_options(extra, message):
    proc = run_cmd([PYTHON, REPO / "bin/check_options.py", *PREFLIGHT.split(), *extra], check=False)
    if message is None:
        assert proc.returncode == 0, proc.stderr[-800:]
    else:
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-800:]


def test_bad_input_to_each_entry_point_is_one_line_and_writes_nothing(tmp_path):
    procs = {}
    for name, (args, _) in CASES.items():
        out = tmp_path / f"out_{name}"
        argv = [a.replace("OUT", str(out)) for a in args.split()]
        procs[name] = subprocess.Popen(
            [PYTHON, str(REPO / "bin" / name), *argv],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        out = tmp_path / f"out_{name}"
        lines = [ln for ln in stderr.splitlines() if " ERROR " in ln or "error:" in ln]
        expected = CASES[name][1].replace("OUT", str(out))
        assert proc.returncode in (1, 2) and "Traceback" not in stderr, (name, stderr[-1500:])
        assert len(lines) == 1 and expected in lines[0], (name, stderr[-1500:])
        assert not out.exists(), name
