"""The adapter library never imports the runner side (docs/development.md, "Layout"): a user of `KronModel` gets no
CLI, training loop, GLUE code or study with it, and the two sides can grow apart safely."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kronpeft"
LIBRARY = {"__init__", "kron", "config", "layers", "presets", "injection", "model", "hub", "atomic", "interop",
           "budget", "export", "mixed", "trainer_callback", "choices", "names", "memory", "sharding"}
RUNNER = {"__main__", "cli", "train", "data", "metrics", "text2text", "baselines", "study", "report", "plots",
          "errors", "feedback", "tracking", "run_checks", "scale", "selection", "mpnet", "stats", "gridcheck"}


def kronpeft_imports(path: Path) -> set[str]:
    """The kronpeft modules `path` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:  # from .x import y / from . import x
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kronpeft"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("kronpeft.")}
    return found


def test_every_module_is_on_one_side():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == LIBRARY | RUNNER, ("a new module: add it to LIBRARY or RUNNER here and to the Layout in "
                                         "docs/development.md")
    assert not LIBRARY & RUNNER


def test_the_library_imports_nothing_from_the_runner_side():
    crossing = {m: sorted(kronpeft_imports(PACKAGE / f"{m}.py") & RUNNER) for m in sorted(LIBRARY)}
    assert {m: v for m, v in crossing.items() if v} == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from .train import run\n    from . import cli\n    import kronpeft.study\n")
    assert kronpeft_imports(probe) == {"train", "cli", "study"}
