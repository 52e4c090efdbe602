"""The package's shape: modules import in one direction (lower layers never reach up), counting imports made inside
functions, which hide a cycle until the function runs."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lit_gpt"


def imports_of_each_module() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lit_gpt"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("lit_gpt")}
        modules[name] = found - {name}
    return modules


def test_no_module_of_the_package_imports_itself_back():
    modules = imports_of_each_module()
    assert {"lit_gpt.model", "lit_gpt.checkpoint", "lit_gpt.fabric", "lit_gpt.training"} <= set(modules)

    def reachable(start: str) -> set[str]:
        seen, stack = set(), [start]
        while stack:
            for module in modules.get(stack.pop(), ()):
                if module not in seen:
                    seen.add(module)
                    stack.append(module)
        return seen

    cycles = sorted({tuple(sorted((a, b))) for a in modules for b in modules[a] if a in reachable(b)})
    assert cycles == [], f"import cycles: {cycles}"


def test_the_tools_start_without_lightning():
    """Importing Lightning takes about 4.5 s of a tool's start on two cores (it imports torchmetrics, which imports
    transformers and scipy where they are installed). Only training needs it: generate, evaluate, convert, merge,
    download and prepare do without it, so that `python generate/base.py --help` answers in about 2 s, not 6.5."""
    import subprocess
    import sys

    tools = ["generate.base", "eval.perplexity", "eval.passkey", "eval.attention", "eval.lm_eval_harness",
             "scripts.convert_hf_checkpoint", "scripts.convert_lit_checkpoint", "scripts.merge_lora",
             "scripts.download", "scripts.prepare_openwebtext"]
    check = ("import importlib, sys\n"
             f"for name in {tools!r}:\n"
             "    importlib.import_module(name)\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torchmetrics')))\n")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=PACKAGE.parent,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
