"""Every Python block of docs/ecosystem.md runs, in order, in one namespace (real MiniLM, offline), and every
block of the README runs exactly as printed."""
import re
from pathlib import Path


DOC = Path(__file__).resolve().parents[1] / "docs" / "ecosystem.md"
HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def test_ecosystem_examples_run(minilm_path, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(blocks):
        code = block.replace(f'"{HUB_NAME}"', repr(str(minilm_path)))  # offline: the packaged copy
        exec(compile(code, f"{DOC.name} block {i}", "exec"), namespace)
    checkpoint_mb = sum(f.stat().st_size for f in (tmp_path / "trainer-run" / "checkpoint-2").rglob("*")) / 2**20
    print(f"checkpoint-2: {checkpoint_mb:.2f} MB")
    assert checkpoint_mb < 5


README = DOC.parents[1] / "README.md"


def test_readme_examples_run_as_written(minilm_path, tmp_path, monkeypatch, capsys):
    """The README's Python, exactly as printed (it loads the packaged all-MiniLM-L6-v2 itself)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md block {i}", "exec"), {})
    printed = capsys.readouterr().out
    assert "trainable params:" in printed and "tensor([1, 0])" in printed  # the output its comments promise
    assert (tmp_path / "my-adapter" / "adapter_config.json").is_file()
