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
