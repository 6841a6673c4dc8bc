"""Imports run one way (DESIGN §6, STYLE §11): no circle anywhere in ``src/seqloss``, the core
modules in their floors, the dense spec importing nothing it checks, no private name imported from
a sibling. Read from the source with ``ast``, so a function-level import counts too."""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "seqloss"

# Floors of the core, bottom first: a module imports only from floors below its own.
FLOORS = [
    {"seqloss._lazy", "seqloss.reference", "seqloss._buffers", "seqloss.sampling", "seqloss.parallel",
     "seqloss.parallel.collectives"},
    {"seqloss.call"},  # the call's data model, below the validator and the plan alike
    {"seqloss.support", "seqloss.token_math", "seqloss._validate_parallel", "seqloss._validate_values"},
    {"seqloss._validate"},
    {"seqloss.plan", "seqloss._validate_sampled", "seqloss.stats", "seqloss.parallel.sequence"},
    {"seqloss.grouped"},  # the fused engines' shared list part
    {"seqloss.torch_logits", "seqloss.torch_linear", "seqloss.kernels", "seqloss.kernels.engine",
     "seqloss.kernels.parts", "seqloss.kernels.support_ce", "seqloss.kernels.candidates", "seqloss.kernels.finish", "seqloss.torch_sampled", "seqloss.parallel.vocab_logits"},
    {"seqloss.autograd"},
    {"seqloss.dispatch"},
    {"seqloss.functional", "seqloss.parallel.normalise"},
    {"seqloss.modules"},
]
FLOOR = {module: i for i, floor in enumerate(FLOORS) for module in floor}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(module: str) -> bool:
    base = SRC.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _imports(path: Path) -> dict[str, set[str]]:
    """seqloss modules imported by the file at ``path`` → the names it takes from each."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "seqloss":
                    found.setdefault(alias.name, set())
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "seqloss":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if _exists(sub):  # `from . import kernels` imports a module, not a name
                    found.setdefault(sub, set())
                else:
                    found.setdefault(target, set()).add(alias.name)
    found.pop(name, None)
    return found


GRAPH = {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_graph_is_read():
    assert {"seqloss.plan", "seqloss.dispatch", "seqloss.reference"} <= GRAPH.keys()
    assert "seqloss.plan" in GRAPH["seqloss.torch_logits"]


def test_no_import_circle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list) -> None:
        state[module] = 1
        for target in GRAPH.get(module, {}):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target, path + [target])
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("module", sorted(FLOOR))
def test_core_modules_import_only_from_floors_below(module):
    for target in GRAPH[module]:
        if target in FLOOR and not (module.startswith("seqloss.kernels") and target.startswith("seqloss.kernels")):
            assert FLOOR[target] < FLOOR[module], f"{module} imports {target}, which is not below it"
        assert target in FLOOR, f"core module {module} imports {target}, outside the core"


def test_the_reference_imports_nothing_it_checks():
    assert GRAPH["seqloss.reference"] == {}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_private_name_from_a_sibling(module):
    for target, names in GRAPH[module].items():
        private = sorted(n for n in names if n.startswith("_") and not n.startswith("__"))
        assert not private, f"{module} imports private {private} from {target}"


def test_one_dispatch_table_covers_every_path_and_impl():
    from seqloss import dispatch
    assert set(dispatch.TABLE) == {(path, impl) for path in ("logits", "linear", "sampled")
                                   for impl in ("reference", "torch", "triton")} | {
        ("logits", "vocab_parallel"), ("linear", "vocab_parallel")}


# --- an option lives in a few places (STYLE §13) ------------------------------------------------------

OPTIONS = ("shift", "ignore_index", "label_smoothing", "reduction", "num_items_in_batch", "impl", "position_ids",
           "turns", "softcap", "z_loss", "class_weight", "token_weights", "return_stats")
# Set options as users do: the integrations, the workbench, and the helpers beside the losses that take
# the same keywords for what they compute (seqloss.num_items_in_batch counts what "mean" divides by).
CONSUMERS = ("seqloss.hf", "seqloss.workbench", "seqloss.cli", "seqloss.masking", "seqloss.parallel.normalise")


def _code_names(path: Path) -> set[str]:
    """Identifiers and plain string literals of a file: what code names, docstrings and comments aside."""
    out = set()
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.NAME:
            out.add(token.string)
        elif token.type == tokenize.STRING and not token.string.startswith(('"""', "'''", "f")):
            out.add(token.string.strip("'\""))
    return out


@pytest.mark.parametrize("option", OPTIONS)
def test_an_option_is_named_in_at_most_six_core_files(option):
    # Its check, the call's data model, the plan, the math of the engines that read it, the reference:
    # not every layer a call passes through (the hf layer and the workbench set options as users do).
    naming = [_module_name(p) for p in sorted(PACKAGE.rglob("*.py"))
              if not _module_name(p).startswith(CONSUMERS) and option in _code_names(p)]
    assert len(naming) <= 6, f"{option} is named in {len(naming)} core modules: {naming}"
