"""Issue 24 §1-4: names and paths that become file operations. An adapter name is one safe path component,
a save deletes only what kronpeft writes, a conversion never writes over the adapter it reads, and an
empty path is an error (never the current folder)."""
import os

import pytest
import torch
from conftest import GLUE_DIR, make_model, model_inputs, one_error_line, outputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kronpeft import KronAConfig, KronModel, get_model
from kronpeft.runner import cli
from kronpeft.config import BASE_ADAPTER_NAME
from kronpeft.interop import from_peft, to_peft

BAD_NAMES = ["/ABSOLUTE/dir", "a/b", "../x", "..", ".", ".hidden", "a\\b", "", " ", "a b", "-x", "x" * 65, "a.b",
             "é", "a\nb", BASE_ADAPTER_NAME, 3, None]


@pytest.fixture
def kron():
    return get_model(make_model("bert"), KronAConfig(modules_to_save=[]))


# -- §1 adapter names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_adapter_names_are_refused_everywhere(kron, tmp_path, name):
    if isinstance(name, str) and name.startswith("/ABSOLUTE"):  # never a real absolute path outside tmp_path
        name = str(tmp_path / "absolute" / "dir")
    keys = sorted(kron.state_dict())
    with pytest.raises(ValueError, match="adapter name .* is not allowed: use 1-64 characters"):
        kron.add_adapter(name, KronAConfig(modules_to_save=[]))
    with pytest.raises(ValueError, match="is not allowed"):
        get_model(make_model("bert"), KronAConfig(), adapter_name=name)
    kron.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="is not allowed"):
        kron.load_adapter(tmp_path / "saved", name)
    with pytest.raises(ValueError, match="is not allowed"):
        KronModel.from_pretrained(make_model("bert"), tmp_path / "saved", adapter_name=name)
    assert sorted(kron.state_dict()) == keys and list(kron.configs) == ["default"]


def test_absolute_adapter_name_cannot_write_or_delete_outside_the_save_folder(kron, tmp_path):
    """The defect: add_adapter('/abs/dir') was accepted, and save_pretrained wrote into /abs/dir and
    deleted its adapter_model*.safetensors and *.tmp-* files."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_model_mine.safetensors").write_text("the user's file")
    (outside / "draft.tmp-1").write_text("the user's file")
    with pytest.raises(ValueError, match="is not allowed"):
        kron.add_adapter(str(outside), KronAConfig(modules_to_save=[]))
    kron.save_pretrained(tmp_path / "save")
    assert sorted(p.name for p in outside.iterdir()) == ["adapter_model_mine.safetensors", "draft.tmp-1"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(min_size=0, max_size=70))
def test_any_accepted_name_saves_inside_the_folder(kron, tmp_path_factory, name):
    folder = tmp_path_factory.mktemp("save")
    try:
        kron.add_adapter(name, KronAConfig(modules_to_save=[]))
    except ValueError:
        return
    try:  # checked before saving: an unsafe name must not write outside the test's folder
        assert (folder / "out" / name).resolve().parent == (folder / "out").resolve()
        kron.save_pretrained(folder / "out", selected_adapters=[name])
        written = [p for p in folder.rglob("*") if p.is_file()]
        assert written and all(p.parent == folder / "out" / name for p in written)
    finally:
        kron.delete_adapter(name)


@pytest.mark.parametrize("name", ["default", "task_2", "A-b_9", "_x", "x" * 64])
def test_safe_names_are_accepted(tmp_path, name):
    kron = get_model(make_model("bert"), KronAConfig(), adapter_name=name)
    kron.save_pretrained(tmp_path, selected_adapters=[name])
    assert (tmp_path / ("" if name == "default" else name) / "adapter_config.json").is_file()


# -- §2 a save deletes only what kronpeft wrote --------------------------------------------------------------

USER_FILES = ["adapter_model_backup.safetensors", "adapter_model.old.safetensors", "adapter_model.safetensors.bak",
              "notes.tmp-draft.txt", "adapter_config.json.tmp-mine", "x.tmp-0123abcd", "adapter_modelX.safetensors"]


def test_save_into_a_folder_keeps_the_users_files(kron, tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    for name in USER_FILES:
        (folder / name).write_text("the user's file")
    kron.save_pretrained(folder)  # a first save into an existing folder
    kron.save_pretrained(folder)  # an overwrite (versioned weights, then the plain name)
    assert sorted(p.name for p in folder.iterdir()) == sorted(USER_FILES + ["adapter_config.json",
                                                                            "adapter_model.safetensors"])
    assert all((folder / n).read_text() == "the user's file" for n in USER_FILES)


def test_leftovers_of_an_interrupted_save_are_still_removed(kron, tmp_path):
    kron.save_pretrained(tmp_path)
    leftovers = ["adapter_model.0123abcd.safetensors", "adapter_model.0123abcd.safetensors.tmp-89abcdef",
                 "adapter_config.json.tmp-0badf00d"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half a file")
    kron.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_folder_swap_removes_only_its_own_hidden_folders(tmp_path):
    from kronpeft.atomic import replacing_dir

    target = tmp_path / "m"
    mine = [tmp_path / ".m.tmp-999999999-0123abcd", tmp_path / ".m.tmp-old-999999999-0123abcd"]
    users = [tmp_path / ".m.tmp-999999999-notes", tmp_path / ".m.tmp-999999999"]
    for folder in mine + users:
        folder.mkdir()
    with replacing_dir(target) as tmp:
        (tmp / "f").write_text("x")
    assert not any(p.exists() for p in mine) and all(p.is_dir() for p in users)


# -- §3 convert never writes over the adapter it reads -----------------------------------------------------

def test_convert_onto_its_own_source_is_refused(kron, tmp_path, capsys):
    src = tmp_path / "kron"
    kron.save_pretrained(src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for out in (src, src / "peft", tmp_path):
        code = cli.main(["convert", "--to", "peft", str(src), str(out), "--overwrite"])
        one_error_line(capsys, code, "out", "source", "inside/around")
        with pytest.raises(ValueError, match="inside/around"):
            to_peft(src, out)
        with pytest.raises(ValueError, match="inside/around"):
            from_peft(src, out)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    inputs = model_inputs(make_model("bert"))
    assert torch.equal(outputs(KronModel.from_pretrained(make_model("bert"), src), inputs), outputs(kron, inputs))


# -- §4 an empty path is an error ------------------------------------------------------------------------------

QUICK = ["--task", "rte", "--data-dir", str(GLUE_DIR), "--max-train-samples", "8", "--max-eval-samples", "8",
         "--max-length", "16", "--batch-size", "8", "--max-steps", "1", "--no-eval-before"]  # quick if it runs


@pytest.mark.parametrize("argv", [
    ["train", "--output-dir", "", *QUICK], ["train", "--output-dir", " ", "--overwrite", *QUICK],
    ["eval", "--adapter", ""], ["eval", "--adapter", "a", "--output", ""],
    ["merge", "--adapter", "", "--out", "x"], ["merge", "--adapter", "a", "--out", ""],
    ["generate", "--adapter", "", "--prompt", "hi"], ["report", "grid.toml", "--out", ""],
    ["convert", "--to", "peft", "", "x"], ["convert", "--to", "peft", "a", "", "--overwrite"],
])
def test_empty_paths_are_refused(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "mine.txt").write_text("the user's file")
    one_error_line(capsys, cli.main(argv), "empty")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adapter", "mine.txt"]


def test_empty_save_directory_is_refused_in_the_library(kron, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for bad in ("", " "):
        with pytest.raises(ValueError, match="save_directory is empty"):
            kron.save_pretrained(bad)
        with pytest.raises(ValueError, match="out_dir is empty"):
            to_peft(tmp_path / "nowhere", bad)
    assert not os.listdir(tmp_path)
