"""Every Python block of docs/beyond.md runs, in order, in one namespace (tiny models from configs)."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "beyond.md"


def test_beyond_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 6
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} block {i}", "exec"), namespace)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # one layer's (out, in)
    lora_rank_3 = 3 * sum(o + i for o, i in shapes) * 2
    assert 0 < namespace["n"] <= lora_rank_3
