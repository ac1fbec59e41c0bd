"""The layering ARCHITECTURE.md states is the layering the imports keep: a module imports only
modules of its own layer or of layers below it (tests/test_options.py checks there is no cycle)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pmap"

ARCHITECTURE = PACKAGE.parent / "ARCHITECTURE.md"


def read_layers() -> list:
    """(name, [module prefixes]) from top to bottom, as ARCHITECTURE.md's table of layers lists them."""
    lines = ARCHITECTURE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## Layers"))
    layers = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 and "`" in cells[1]:
            layers.append((cells[0], [name.strip("` ") for name in cells[1].split(",")]))
    assert layers, "ARCHITECTURE.md has no table of layers"
    return layers


LAYERS = read_layers()  # a module belongs to the layer with the longest prefix that names it


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best = None
    for depth, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (depth, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to ARCHITECTURE.md's table of layers"
    return best[0]


def imports_of(path: Path) -> set:
    """pmap modules the file imports, at any depth of its code (lazy imports count too)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "pmap" or target.startswith("pmap."):
                if node.module is None or target == "pmap":  # `from . import x`: x may be a module
                    found.update(f"{target}.{alias.name}" if _is_module(f"{target}.{alias.name}") else target
                                 for alias in node.names)
                else:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "pmap" or a.name.startswith("pmap."))
    return found


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_every_module_imports_only_its_layer_and_below():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        here = layer_of(module)
        for imported in sorted(imports_of(path)):
            if imported == "pmap.__version__" or module.startswith("pmap.cli") and imported == "pmap":
                continue  # the CLI reads the package's version and public names
            if layer_of(imported) < here:
                upward.append(f"{module} ({LAYERS[here][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})")
    assert not upward, "imports that reach up a layer:\n" + "\n".join(upward)


def test_every_module_listed_exists():
    missing = [prefix for _, prefixes in LAYERS for prefix in prefixes if not _is_module(prefix)]
    assert not missing, f"ARCHITECTURE.md lists modules that do not exist: {missing}"
