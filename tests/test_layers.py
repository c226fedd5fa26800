"""The house rules, read from the source (ast, nothing executed): libraries at the bottom, commands
on top, no import circle, no upward import, no sibling import inside a function, nothing imports
benchmark.py, common.py is torch-free, and no product function is longer than 80 lines."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# docs/API.md "Layers": each module may import only modules of lower layers
LAYERS = [
    ["common"],                                           # conventions, torch-free
    ["text_tokenizer"],                                   # the tokenizer and the chat template
    ["readers"],                                          # raw text -> documents; files that are not text
    ["token_data"],                                       # .bin token files, samplers, SFT data
    ["data_utils"],                                       # the hold-out rule, filter, mixer, prepare
    ["cpu_kernels"],                                      # FishAI's int8/int4/fp16 CPU matmuls (C, ctypes)
    ["quantized"],                                        # the .bin format and its int8/int4 runtime layers
    ["model"],                                            # the GPT, checkpoints, load_model, HF interop
    ["engine", "optim"],                                  # the decode engine; the optimizers and schedules
    ["scoring"],                                          # LM, log-likelihoods, perplexity, eval texts
    ["tokenizer_train", "train", "generate", "quantize"],  # commands
    ["evaluate", "reference_benchmark", "quick_train", "serve"],
    ["benchmark"],                                        # the benchmark commands: nothing imports it
]
LAYER = {m: i for i, mods in enumerate(LAYERS) for m in mods}
PRODUCT = sorted(p.stem for p in ROOT.glob("*.py"))


def sibling_imports(path: Path):
    """(module imported, inside a function?) for every import of a product module in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        for name in names:
            if name in PRODUCT:
                yield name, id(node) in in_function, node.lineno


def test_every_product_module_has_a_layer():
    assert set(PRODUCT) <= set(LAYER), f"give these modules a layer: {sorted(set(PRODUCT) - set(LAYER))}"


@pytest.mark.parametrize("module", PRODUCT)
def test_imports_only_run_downwards(module):
    for name, in_function, line in sibling_imports(ROOT / f"{module}.py"):
        assert not in_function, f"{module}.py:{line}: imports {name} inside a function (import it at the top)"
        assert LAYER[name] < LAYER[module], (f"{module}.py:{line}: imports {name} (layer {LAYER[name]}) from "
                                             f"layer {LAYER[module]}: an upward or sideways import")
    assert module == "benchmark" or "benchmark" not in {n for n, _, _ in sibling_imports(ROOT / f"{module}.py")}


def test_common_is_torch_free_at_import():
    tree = ast.parse((ROOT / "common.py").read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top for a in getattr(n, "names", [])} | {
        n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.module}
    assert not names & {"torch", "numpy", "tokenizers", "transformers"}, names


@pytest.mark.parametrize("module", PRODUCT)
def test_no_function_over_80_lines(module):
    tree = ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8"))
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert not long, f"{module}.py: functions over 80 lines: {long}"


def test_every_script_has_main_and_a_usage_docstring():
    for module in PRODUCT:
        tree = ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8"))
        doc = ast.get_docstring(tree) or ""
        assert doc, f"{module}.py has no module docstring"
        if any(isinstance(n, ast.If) and "__main__" in ast.dump(n.test) for n in tree.body):
            mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
            assert mains and [a.arg for a in mains[0].args.args] == ["argv"] and \
                mains[0].args.defaults and getattr(mains[0].args.defaults[0], "value", 0) is None, \
                f"{module}.py: the entry point is main(argv=None)"
            assert "python " in doc, f"{module}.py: the docstring shows no copy-paste usage"


@pytest.mark.parametrize("module", PRODUCT)
def test_imports_come_first(module):
    """docs/API.md "Imports": a module's top-level imports all come before its first other statement
    (the docstring and `from __future__` aside), so no import needs a `noqa: E402`."""
    text = (ROOT / f"{module}.py").read_text(encoding="utf-8")
    assert "noqa: E402" not in text, f"{module}.py: an import after code (noqa: E402)"
    body = ast.parse(text).body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]
    kinds = [isinstance(n, (ast.Import, ast.ImportFrom)) for n in body]
    first_code = kinds.index(False) if False in kinds else len(kinds)
    late = [n.lineno for n, is_import in zip(body[first_code:], kinds[first_code:]) if is_import]
    assert not late, f"{module}.py: imports after code at lines {late}"


def test_where_to_change_what_names_functions_that_exist():
    """docs/API.md "Where to change what": every file it names exists and holds every function,
    class, method (Class.method) or constant named beside it."""
    import re
    text = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    section = text.split("## Where to change what", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith(("| to change", "|---"))]
    assert len(rows) >= 12, rows
    for row in rows:
        _, files, where = [c.strip() for c in row.strip("|").split("|")]
        modules = re.findall(r"`([a-z_]+)\.py`", files) + re.findall(r"`([a-z_]+)\.py`", where)
        names = [n for n in re.findall(r"`([A-Za-z_][\w.]*)`", where) if not n.endswith(".py")]
        defined = {}
        for m in modules:
            for node in ast.parse((ROOT / f"{m}.py").read_text(encoding="utf-8")).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defined[node.name] = node
                elif isinstance(node, ast.Assign):
                    defined.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        for name in names:
            owner, _, method = name.partition(".")
            assert owner in defined, f"docs/API.md: {name} is not in {modules}"
            if method:
                assert any(isinstance(n, ast.FunctionDef) and n.name == method for n in defined[owner].body), name
