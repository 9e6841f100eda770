"""Helpers for the kernel-image tests: the catalog recipes and how to check
their framework, and small wheels made on the spot."""
from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import EXTRA_IMAGES, IMAGE_PREFIX

from bai_spawner.images import recipes as R
from bai_spawner.images import sources

# framework label -> (module the seed's check imports, distribution its recipes pin)
FRAMEWORKS = {
    "scikit-learn": ("sklearn", {"scikit-learn"}),
    "TensorFlow": ("tensorflow", {"tensorflow", "tensorflow-cpu"}),
    "PyTorch": ("torch", {"torch"}),
}


@dataclass(frozen=True)
class CatalogRecipe:
    name: str
    ref: str
    module: str
    version: str     # the pinned version, e.g. 2.13.0+cpu
    default: bool

    def says(self, printed: str) -> bool:
        """``module.__version__`` is the pin, or the pin with the build's local
        label (PyPI's torch 2.14.1 says 2.14.1+cu130)."""
        return printed == self.version or printed.startswith(self.version + "+")

    def seed_check(self) -> str:
        """The seed's check, as typed in a terminal."""
        return f'python -c "import {self.module}; print({self.module}.__version__)"'


def catalog_recipes() -> list[CatalogRecipe]:
    """Every offered recipe whose Python this base has, with its expected version."""
    out = []
    for name, r in sorted(R.load_recipes(sources.recipes_dir()).items()):
        if not r.offered or r.python is not None or r.framework not in FRAMEWORKS:
            continue
        module, dists = FRAMEWORKS[r.framework]
        pin = next(p for p in r.packages if R.dist_name(p) in dists)
        out.append(CatalogRecipe(name, r.image_ref(IMAGE_PREFIX), module, pin.split("==", 1)[1], r.default))
    return out


def recipe_params() -> list:
    """``catalog_recipes()`` as pytest params; images not built by default are
    marked ``extra_images`` (run with ``scripts/run-tests -m extra_images``)."""
    extra = (pytest.mark.slow, getattr(pytest.mark, EXTRA_IMAGES))
    return [pytest.param(c, id=c.name, marks=() if c.default else extra) for c in catalog_recipes()]


def make_wheel(directory: Path, name: str, version: str = "1.0", init: str = "", payload_size: int = 0) -> Path:
    """A pure-Python wheel made on the host (no network, no build tools) of
    package ``name`` (importable with dashes as underscores; ``init`` is its
    ``__init__.py``), with ``payload_size`` random bytes to make it large."""
    dist = name.replace("-", "_")
    files = {
        f"{dist}/__init__.py": (init or f"__version__ = {version!r}\n").encode(),
        f"{dist}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}-{version}.dist-info/WHEEL":
            b"Wheel-Version: 1.0\nGenerator: bai-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    if payload_size:
        files[f"{dist}/payload.bin"] = os.urandom(payload_size)
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()]
    record.append(f"{dist}-{version}.dist-info/RECORD,,")
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{dist}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return wheel
