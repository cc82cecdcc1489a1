"""The shape of the code base (docs/DESIGN.md): no import cycle between modules or between the
packages of comflp/, no function over 60 lines, thin entry points, one default per option."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from comflp import settings
from comflp.settings import REQUIRED

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "comflp"
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The comflp modules a file imports anywhere (functions included), not counting
    ``if TYPE_CHECKING`` blocks (none exist)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    graph = {}
    for name, path in files.items():
        # importing a package's module also runs the package's __init__
        deps = imported_modules(path, known)
        graph[name] = {d for d in deps if d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, or None (depth-first search, colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def package_of(module: str) -> str:
    """comflp.prune.scores.matrix -> comflp.prune; top-level modules stand for themselves."""
    parts = module.split(".")
    return ".".join(parts[:2])


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    assert find_cycle(import_graph()) is None


def test_no_import_cycle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, deps in import_graph().items():
        mine = package_of(module)
        packages.setdefault(mine, set()).update(
            package_of(d) for d in deps if package_of(d) != mine
        )
    assert find_cycle(packages) is None
    # the layering the design document describes, spot-checked
    assert "comflp.adapters" not in packages["comflp.asr"]
    assert "comflp.prune" not in packages["comflp.asr"] | packages["comflp.adapters"]
    assert "comflp.prune" not in packages["comflp.expdir"]


def long_functions() -> list[str]:
    """Functions over the limit in comflp/, the benchmark scripts of bench/ and the recipes'
    own scripts (egs/*/local/)."""
    out = []
    scripts = [*(REPO / "bench").glob("*.py"), *(REPO / "egs").glob("*/local/*.py")]
    for path in [*PACKAGE.rglob("*.py"), *scripts]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(
                        f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)"
                    )
    return out


def test_no_function_over_60_lines():  # comflp/, bench/, egs/*/local/
    assert long_functions() == []


def test_entry_points_are_thin():
    """Each bin/ script hands its stage's settings to one core function: nothing else."""
    for path in sorted((REPO / "bin").glob("*.py")):
        tree = ast.parse(path.read_text())
        body = [n for n in tree.body if not isinstance(n, ast.Expr)]  # the docstring
        assert [type(n).__name__ for n in body] == ["ImportFrom", "ImportFrom", "If"], path.name
        call = body[2].body[0].value
        assert isinstance(call, ast.Call) and call.func.id == "main", path.name


# ----------------------------------------------------------------------------- run.sh


def run_sh_defaults() -> dict[str, str]:
    """``name=value`` lines of run.sh's option block, values unquoted."""
    text = (REPO / "run.sh").read_text()
    block = text[text.index("# ---- general") : text.index("help_message=")]
    out = {}
    for line in block.splitlines():
        if m := re.match(r'^([a-z_]+)=("([^"]*)"|(\S*))', line):
            out[m.group(1)] = m.group(3) if m.group(3) is not None else m.group(4)
    return out


def stage_settings() -> list[type]:
    from comflp.prune.methods import CompareSettings
    from comflp.stages.compare import DecodeSettings, ResultsSettings
    from comflp.stages.data import FbankSettings, PrepareSettings, TokenizerSettings
    from comflp.stages.dump import DumpSettings, MergeDumpSettings
    from comflp.stages.scores import ScoreSettings
    from comflp.stages.search import SearchSettings
    from comflp.stages.train import (
        FinetuneSettings,
        StructuredSettings,
        TrainSettings,
    )

    return [
        PrepareSettings,
        FbankSettings,
        TokenizerSettings,
        TrainSettings,
        DumpSettings,
        MergeDumpSettings,
        ScoreSettings,
        SearchSettings,
        CompareSettings,
        DecodeSettings,
        ResultsSettings,
        FinetuneSettings,
        StructuredSettings,
    ]


def as_shell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return " ".join(map(as_shell, value))
    return str(value)


def same_value(shell: str, python: str) -> bool:
    try:
        return [float(a) for a in shell.split()] == [float(b) for b in python.split()]
    except ValueError:
        return shell == python


def test_run_sh_defaults_are_the_settings_defaults():
    shell = run_sh_defaults()
    checked = 0
    for cls in stage_settings():
        for name, default in settings.defaults(cls).items():
            # exp_dir: the recipe's experiment in run.sh, given to every entry point
            if name in shell and default is not REQUIRED and name != "exp_dir":
                assert same_value(shell[name], as_shell(default)), (cls.__name__, name)
                checked += 1
    assert checked >= 30


def test_local_scripts_defaults_are_run_sh_defaults():
    """The recipe's own scripts (local/) default to what run.sh passes them."""
    shell = run_sh_defaults()
    checked = 0
    for script in sorted((REPO / "local").glob("*.py")):
        for name, default in re.findall(
            r'add_argument\("--([a-z_]+)"[^)]*?default=([^,)]+)', script.read_text()
        ):
            if name in shell:
                assert same_value(shell[name], default.strip("\"'")), (script.name, name)
                checked += 1
    assert checked >= 4


# Options whose run.sh value is not a run.sh option of the same name: job-array plumbing and
# paths composed by run.sh from its options.
PLUMBING = {"part", "num_parts", "cuts", "train_cuts", "dev_cuts", "output_dir", "manifest_dir"}
COMPOSED = {
    ("subsets", "all_sets"),  # train_set, dev_set and test_sets together
    ("search_methods", "method"),  # stage 6 runs one search of search_methods per job
    ("command", "run_command"),  # run.sh's own command line, for RESULTS.md
    ("nproc_per_node", "procs"),  # torchrun's option: ngpu or nproc
    ("stack", "stacks"),  # stage 7 lists every stack of the run
    ("model_dir", "stack_dir"),  # a stack's model: with both stacks, the encoder-pruned one
    ("num_prune", "stack_prunes"),  # a stack's P values: the decoder's may be decoder_num_prune
}


def test_run_sh_passes_every_option_under_its_own_name():
    """``--name "$var"``: the same name on both sides, or run.sh-composed plumbing."""
    text = (REPO / "run.sh").read_text()
    pairs = re.findall(r'--([a-z_]+) "\$\{?([a-z_]+)', text)
    assert len(pairs) > 40
    mismatched = {(opt, var) for opt, var in pairs if opt != var and opt not in PLUMBING}
    assert mismatched == COMPOSED


@pytest.mark.parametrize("cls", stage_settings(), ids=lambda c: c.__name__)
def test_every_option_has_help(cls):
    import dataclasses

    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name}"


def test_list_options_collect_repeats_and_keep_their_defaults():
    import argparse
    from dataclasses import dataclass

    @dataclass(kw_only=True)
    class Example:
        set: list[str] = settings.option([], "overrides")
        num_prune: list[int] = settings.option([6], "layers")

    parser = argparse.ArgumentParser()
    settings.add_settings(parser, Example)
    parsed = settings.from_args(Example, parser.parse_args(["--set", "a=1", "--set", "b=2 c=3"]))
    assert parsed.set == ["a=1", "b=2", "c=3"] and parsed.num_prune == [6]
    parsed = settings.from_args(Example, parser.parse_args(["--num_prune", "2 4", "8"]))
    assert parsed.num_prune == [2, 4, 8] and parsed.set == []
