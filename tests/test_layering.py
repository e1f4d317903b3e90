"""The adapter library never imports the runner side (README, "Layout"): a user of `KronModel` gets no
CLI, training loop, GLUE code or study with it, and the two sides can grow apart safely.

A module's side is its folder: the package root and `integrations/` are the library, `runner/` (any
depth) the runner. `__main__` (`python -m kronpeft`) and `cli` (a one-release re-export for the console
script of older installs) are the entry points that start the runner."""
import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kronpeft"
LIBRARY_DIRS = ("", "integrations")
RUNNER_DIR = "runner"
ENTRY_POINTS = {"__main__", "cli"}


def package_of(path: Path) -> str:
    """The package relative imports in `path` start from: src/kronpeft/runner/x.py -> kronpeft.runner."""
    return ".".join(["kronpeft", *path.relative_to(PACKAGE).parent.parts])


def kronpeft_imports(path: Path, package: str | None = None) -> set[str]:
    """The kronpeft modules (absolute, dotted) `path` imports anywhere (module level or inside functions);
    `from m import n` counts `m` and `m.n`, since `n` may be a module."""
    package = package or package_of(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import y / from .. import x
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "kronpeft":
                module = node.module
            else:
                continue
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kronpeft"}
    return found


def is_runner(module: str) -> bool:
    return module == f"kronpeft.{RUNNER_DIR}" or module.startswith(f"kronpeft.{RUNNER_DIR}.")


def library_modules() -> list[Path]:
    return sorted(p for d in LIBRARY_DIRS for p in (PACKAGE / d).glob("*.py")
                  if not (d == "" and p.stem in ENTRY_POINTS))


def test_every_module_is_on_one_side():
    folders = {"/".join(p.parent.relative_to(PACKAGE).parts) for p in PACKAGE.rglob("*.py")}
    runner = {f for f in folders if f == RUNNER_DIR or f.startswith(RUNNER_DIR + "/")}
    assert folders - runner <= set(LIBRARY_DIRS), "a new folder: put it under runner/, or add it to LIBRARY_DIRS here"
    assert all((PACKAGE / f / "__init__.py").exists() for f in folders - {""}), "every folder is a package"
    assert {p.stem for p in PACKAGE.glob("*.py")} >= ENTRY_POINTS


def test_the_library_imports_nothing_from_the_runner_side():
    crossing = {p.relative_to(PACKAGE).as_posix(): sorted(m for m in kronpeft_imports(p) if is_runner(m))
                for p in library_modules()}
    assert {m: v for m, v in crossing.items() if v} == {}


def test_the_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from .runner.train import run\n    from . import runner\n"
                     "    import kronpeft.runner.study\n    from kronpeft.runner import cli\n"
                     "    from .model import x\n")
    assert {m for m in kronpeft_imports(probe, "kronpeft") if is_runner(m)} == {
        "kronpeft.runner", "kronpeft.runner.train", "kronpeft.runner.train.run", "kronpeft.runner.study",
        "kronpeft.runner.cli"}
    probe.write_text("from ..runner import cli\nfrom .. import model\n")
    assert kronpeft_imports(probe, "kronpeft.integrations") == {
        "kronpeft.runner", "kronpeft.runner.cli", "kronpeft", "kronpeft.model"}


def test_import_kronpeft_loads_nothing_of_the_runner():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")]))
    code = ("import kronpeft, sys, pathlib\n"
            "assert pathlib.Path(kronpeft.__file__).resolve() == pathlib.Path(sys.argv[1]), kronpeft.__file__\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('kronpeft.runner'))\n"
            "assert not loaded, f'import kronpeft loaded {loaded}'")
    done = subprocess.run([sys.executable, "-c", code, str(PACKAGE / "__init__.py")], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_one_release_re_exports_are_the_moved_objects():
    # Deliberately through the re-exports (CHANGELOG.md): remove this test with them.
    from kronpeft import cli, trainer_callback
    from kronpeft.runner import cli as moved_cli
    from kronpeft.integrations import trainer as moved_trainer_callback
    assert cli.main is moved_cli.main
    assert trainer_callback.KronSaveCallback is moved_trainer_callback.KronSaveCallback
