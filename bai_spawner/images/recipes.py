"""Kernel image recipes: parsing, validation and hashing (no Docker, no network).

A recipe is one small TOML file in the recipes folder (``hub_config/images/``)::

    name = "sklearn-1.6"              # recipe name = file name without .toml
    image = "sklearn"                 # optional; the image is <prefix><image>:<version>
                                      # (default: the recipe name)
    framework = "scikit-learn"        # the spawn form groups images by it
    version = "1.6.1"                 # also the image tag
    display_name = "scikit-learn 1.6"
    base = "base"                     # another recipe's name, or "rootfs"
    packages = ["scikit-learn==1.6.1"]  # pip requirements, each pinned with ==
    description = "..."               # optional
    default = true                    # optional; false = built only on request
    python = "3.11"                   # optional; the Python the packages need
    test = "python -c 'import sklearn'"  # optional check run in the new image

Every image has two Python environments (paths in ``layout.py``): the *server
environment* (JupyterLab, jupyterhub-singleuser, jupyter-server-proxy, the
session apps) made by the recipe with ``base = "rootfs"`` from its
``packages``, and the *kernel environment*, made by a kernel recipe built on
it from the base's ``kernel_packages`` (ipykernel, the MLflow client) plus the
recipe's ``packages``. The two are resolved apart, so a framework's pins never
meet the server's. A kernel recipe built on another kernel recipe adds its
packages to that recipe's kernel environment, which it may not downgrade.

Only a recipe whose base is "rootfs" may also set ``kind = "base"``, ``apt``
(extra Debian packages for debootstrap), ``suite``, ``venvs`` (more isolated
environments, ``{name = [requirements]}``, e.g. the MLflow UI server),
``kernel_packages`` and ``extensions`` (install the ``bai-session-apps``
package). A requirement may pin a version to whatever the host has installed
with ``{host:DIST}``, e.g. ``"jupyterhub=={host:jupyterhub}"``.

The recipe hash covers everything that changes the image: the recipe's
effective content, its base chain's hashes, the builder's own script version
(``salt``) and, for a recipe that installs it, the extensions source tree.
A changed recipe therefore rebuilds itself and what is built on it, nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Callable, Iterable, Mapping

from packaging.requirements import InvalidRequirement, Requirement

ROOTFS = "rootfs"
KIND_KERNEL = "kernel"
KIND_BASE = "base"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
# Docker tag grammar: [\w][\w.-]{0,127}
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PY_RE = re.compile(r"^\d+\.\d+$")
_HOST_RE = re.compile(r"\{host:([A-Za-z0-9_.-]+)\}")
_DEB_RE = re.compile(r"^[a-z0-9][a-z0-9.+-]+$")

_REQUIRED = ("name", "framework", "version", "display_name", "base", "packages")
_OPTIONAL = ("image", "description", "default", "python", "test", "kind")
_BASE_ONLY = ("apt", "suite", "venvs", "kernel_packages", "extensions")
# Environment names the builder uses itself (layout.py).
_RESERVED_ENVS = {"server", "kernel"}

# Directories never part of the extensions/ source digest.
_SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules", ".git", ".ipynb_checkpoints",
              ".pytest_cache", ".mypy_cache", ".ruff_cache", ".venv"}


class RecipeError(ValueError):
    """A recipe file is missing, malformed or inconsistent. The message names
    the file, the field and what to do."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    framework: str
    version: str
    display_name: str
    base: str
    packages: tuple[str, ...]
    description: str = ""
    default: bool = True
    python: str | None = None
    test: str | None = None
    kind: str = KIND_KERNEL
    apt: tuple[str, ...] = ()
    suite: str = "bookworm"
    venvs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    kernel_packages: tuple[str, ...] = ()
    extensions: bool = False
    image: str = ""
    path: str = ""

    @property
    def is_root(self) -> bool:
        """Built from the debootstrap rootfs rather than another recipe."""
        return self.base == ROOTFS

    @property
    def offered(self) -> bool:
        """Shown to users in the catalog."""
        return self.kind == KIND_KERNEL

    @property
    def repository(self) -> str:
        return self.image or self.name

    def image_ref(self, prefix: str = "bai/") -> str:
        return f"{prefix}{self.repository}:{self.version}"

    def resolved(self, host_version: Callable[[str], str]) -> "Recipe":
        """Substitute ``{host:DIST}`` placeholders with ``host_version(DIST)``."""
        def sub(spec: str) -> str:
            def repl(m: re.Match) -> str:
                try:
                    return host_version(m.group(1))
                except Exception as e:  # PackageNotFoundError and friends
                    raise RecipeError(
                        f"{self.path or self.name}: packages: {spec!r} pins to the host's "
                        f"{m.group(1)!r}, which is not installed on the host ({e}); install it "
                        f"in the hub's environment or write an explicit version"
                    ) from None
            return _HOST_RE.sub(repl, spec)

        packages = tuple(sub(p) for p in self.packages)
        kernel_packages = tuple(sub(p) for p in self.kernel_packages)
        venvs = tuple((n, tuple(sub(p) for p in reqs)) for n, reqs in self.venvs)
        fields = [("packages", packages), ("kernel_packages", kernel_packages)]
        for field, specs in fields + [(f"venvs.{n}", r) for n, r in venvs]:
            for spec in specs:
                _check_pinned(spec, self.path or self.name, field)
        return dataclasses.replace(self, packages=packages, kernel_packages=kernel_packages, venvs=venvs)

    def content(self) -> dict:
        """What goes into the hash: everything that changes the built image."""
        return {
            "name": self.name, "framework": self.framework, "version": self.version,
            "display_name": self.display_name, "base": self.base, "kind": self.kind,
            "packages": list(self.packages), "python": self.python, "test": self.test,
            "apt": sorted(self.apt), "suite": self.suite,
            "venvs": {n: list(r) for n, r in self.venvs}, "extensions": self.extensions,
            "kernel_packages": list(self.kernel_packages),
            "image": self.repository,
        }


def _err(path: str, field: str, problem: str, todo: str) -> RecipeError:
    return RecipeError(f"{path}: field '{field}' {problem}; {todo}")


def _check_pinned(spec: str, path: str, field: str) -> None:
    if _HOST_RE.search(spec):
        return  # checked again after resolution
    try:
        req = Requirement(spec)
    except InvalidRequirement as e:
        raise _err(path, field, f"has an invalid requirement {spec!r} ({e})",
                   'write it like "scikit-learn==1.6.1"') from None
    pins = [s for s in req.specifier if s.operator in ("==", "===")]
    if req.url or len(pins) != 1 or "*" in pins[0].version:
        raise _err(path, field, f"has {spec!r}, which is not pinned to one version",
                   'pin every package exactly, e.g. "scikit-learn==1.6.1"')


def _str(data: Mapping, key: str, path: str, required: bool = True, pattern=None,
         hint: str = "") -> str | None:
    if key not in data:
        if required:
            raise _err(path, key, "is missing", f"add it, e.g. {key} = {hint or repr('...')}")
        return None
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise _err(path, key, f"must be a non-empty string (got {value!r})",
                   f"write e.g. {key} = {hint or repr('...')}")
    if pattern is not None and not pattern.match(value):
        raise _err(path, key, f"has an invalid value {value!r}", f"use e.g. {hint}")
    return value


def _str_list(data: Mapping, key: str, path: str, required: bool) -> tuple[str, ...]:
    if key not in data:
        if required:
            raise _err(path, key, "is missing",
                       f'add it, e.g. {key} = ["scikit-learn==1.6.1"] (may be empty: [])')
        return ()
    value = data[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _err(path, key, f"must be a list of strings (got {value!r})",
                   f'write e.g. {key} = ["scikit-learn==1.6.1"]')
    return tuple(v.strip() for v in value)


def parse_recipe(data: Mapping, path: str = "<recipe>") -> Recipe:
    """Validate one recipe's TOML table and return a ``Recipe``."""
    known = set(_REQUIRED) | set(_OPTIONAL) | set(_BASE_ONLY)
    unknown = sorted(set(data) - known)
    if unknown:
        raise _err(path, unknown[0], "is not a recipe field",
                   f"remove it or fix its spelling (known fields: {', '.join(sorted(known))})")
    name = _str(data, "name", path, pattern=_NAME_RE, hint='"sklearn-1.6" (lower case, digits, . _ -)')
    stem = Path(path).stem
    if path.endswith(".toml") and stem != name:
        raise _err(path, "name", f"is {name!r} but the file is named {stem}.toml",
                   f"rename the file to {name}.toml or set name = {stem!r}")
    image = _str(data, "image", path, required=False,
                 pattern=re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$"),
                 hint='"sklearn" (lower case; the image is <prefix><image>:<version>)') or ""
    framework = _str(data, "framework", path, hint='"scikit-learn"')
    version = _str(data, "version", path, pattern=_TAG_RE,
                   hint='"1.6.1" (it becomes the image tag: letters, digits, . _ -)')
    display_name = _str(data, "display_name", path, hint='"scikit-learn 1.6"')
    base = _str(data, "base", path, pattern=re.compile(rf"^({ROOTFS}|[a-z0-9][a-z0-9._-]*)$"),
                hint=f'"base" (another recipe\'s name) or "{ROOTFS}"')
    if base == name:
        raise _err(path, "base", "names the recipe itself", 'use another recipe, e.g. base = "base"')
    packages = _str_list(data, "packages", path, required=True)
    for spec in packages:
        _check_pinned(spec, path, "packages")
    description = _str(data, "description", path, required=False) or ""
    default = data.get("default", True)
    if not isinstance(default, bool):
        raise _err(path, "default", f"must be true or false (got {default!r})",
                   "write default = false to build it only on request")
    python = _str(data, "python", path, required=False, pattern=_PY_RE, hint='"3.11"')
    test = _str(data, "test", path, required=False)
    kind = _str(data, "kind", path, required=False,
                pattern=re.compile(rf"^({KIND_KERNEL}|{KIND_BASE})$"), hint='"kernel" or "base"')
    kind = kind or KIND_KERNEL
    if (kind == KIND_BASE) != (base == ROOTFS):
        raise _err(path, "kind", f'is "{kind}" with base = "{base}"',
                   f'a recipe on "{ROOTFS}" makes the server environment and must say kind = "{KIND_BASE}"; '
                   f'a kernel recipe names a base recipe, e.g. base = "base"')
    if base != ROOTFS:
        present = [k for k in _BASE_ONLY if k in data]
        if present:
            raise _err(path, present[0], f'is only allowed in a recipe with base = "{ROOTFS}"',
                       "move it to the base recipe or remove it")
    apt = _str_list(data, "apt", path, required=False)
    for pkg in apt:
        if not _DEB_RE.match(pkg):
            raise _err(path, "apt", f"has an invalid Debian package name {pkg!r}",
                       'list plain package names, e.g. apt = ["git", "less"]')
    suite = _str(data, "suite", path, required=False, pattern=_NAME_RE, hint='"bookworm"') or "bookworm"
    venvs_raw = data.get("venvs", {})
    if not isinstance(venvs_raw, dict):
        raise _err(path, "venvs", f"must be a table (got {venvs_raw!r})",
                   'write e.g. venvs = { mlflow = ["mlflow==3.17.2"] }')
    venvs = []
    for vname in sorted(venvs_raw):
        if not _NAME_RE.match(vname) or vname in _RESERVED_ENVS:
            raise _err(path, f"venvs.{vname}", "is not a usable directory name",
                       f'use a lower-case name other than {" or ".join(sorted(_RESERVED_ENVS))}, e.g. mlflow')
        reqs = _str_list(venvs_raw, vname, path, required=True)
        for spec in reqs:
            _check_pinned(spec, path, f"venvs.{vname}")
        venvs.append((vname, reqs))
    kernel_packages = _str_list(data, "kernel_packages", path, required=False)
    for spec in kernel_packages:
        _check_pinned(spec, path, "kernel_packages")
    extensions = data.get("extensions", False)
    if not isinstance(extensions, bool):
        raise _err(path, "extensions", f"must be true or false (got {extensions!r})",
                   "write extensions = true to install the repository's extensions/ package")
    return Recipe(name=name, framework=framework, version=version, display_name=display_name,
                  base=base, packages=packages, description=description, default=default,
                  python=python, test=test, kind=kind, apt=apt, suite=suite,
                  venvs=tuple(venvs), kernel_packages=kernel_packages, extensions=extensions,
                  image=image, path=path)


def load_recipe(path: str | os.PathLike) -> Recipe:
    path = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file; check the name or the recipes directory") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: is not valid TOML ({e}); fix the syntax") from None
    return parse_recipe(data, path)


def load_recipes(directory: str | os.PathLike) -> dict[str, Recipe]:
    """All ``*.toml`` recipes in ``directory`` by name, with bases checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RecipeError(f"{directory}: recipes directory not found; pass --recipes DIR")
    recipes: dict[str, Recipe] = {}
    for p in sorted(directory.glob("*.toml")):
        r = load_recipe(p)
        recipes[r.name] = r
    check_recipes(recipes)
    return recipes


def check_recipes(recipes: Mapping[str, Recipe]) -> None:
    """Every base exists, there are no cycles, and refs are unique."""
    for r in recipes.values():
        if not r.is_root and r.base not in recipes:
            raise _err(r.path or r.name, "base", f"names {r.base!r}, which is not a recipe",
                       f"use one of: {', '.join(sorted([ROOTFS, *recipes]))}")
        base_chain(recipes, r.name)  # raises on cycles
    refs: dict[str, str] = {}
    for r in recipes.values():
        ref = r.image_ref("")
        if ref in refs:
            raise _err(r.path or r.name, "version", f"gives image {ref!r}, same as recipe {refs[ref]!r}",
                       "give each recipe its own name or version")
        refs[ref] = r.name


def base_chain(recipes: Mapping[str, Recipe], name: str) -> list[str]:
    """``[name, its base, ..., root recipe]``."""
    chain = []
    cur = name
    while True:
        if cur in chain:
            raise RecipeError(f"recipes {' -> '.join(chain + [cur])} form a cycle through 'base'; "
                              f"one of them must have base = \"{ROOTFS}\" or another recipe")
        if cur not in recipes:
            raise RecipeError(f"no recipe named {cur!r}; known: {', '.join(sorted(recipes))}")
        chain.append(cur)
        if recipes[cur].is_root:
            return chain
        cur = recipes[cur].base


def build_order(recipes: Mapping[str, Recipe], names: Iterable[str]) -> list[str]:
    """The recipes needed to build ``names`` (bases included), bases first."""
    order: list[str] = []
    for name in names:
        for n in reversed(base_chain(recipes, name)):
            if n not in order:
                order.append(n)
    return order


def dist_name(spec: str) -> str:
    """Normalised distribution name of a requirement or a ``name==version`` pin."""
    return Requirement(spec).name.lower().replace("_", "-").replace(".", "-")


def kernel_requirements(recipes: Mapping[str, Recipe], name: str) -> list[str]:
    """What a kernel recipe installs into its kernel environment: built on the
    base, the base's ``kernel_packages`` with the recipe's own pins winning
    (a recipe may pin another ipykernel or MLflow client), then its packages;
    built on another kernel recipe, only its packages."""
    r = recipes[name]
    parent = recipes.get(r.base)
    if parent is None or parent.kind != KIND_BASE:
        return list(r.packages)
    own = {dist_name(p) for p in r.packages}
    return [p for p in parent.kernel_packages if dist_name(p) not in own] + list(r.packages)


def default_names(recipes: Mapping[str, Recipe]) -> list[str]:
    return [n for n, r in sorted(recipes.items()) if r.default]


def tree_digest(directory: str | os.PathLike) -> str:
    """Stable digest of a source tree (paths + contents), ignoring build debris."""
    directory = Path(directory)
    h = hashlib.sha256()
    if not directory.is_dir():
        return "absent"
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")
                         and not d.endswith(".egg-info"))
        for fn in sorted(files):
            if fn.endswith((".pyc", ".pyo")) or fn.startswith("."):
                continue
            p = Path(root) / fn
            rel = p.relative_to(directory).as_posix()
            h.update(rel.encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def is_installable(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    return any((d / f).is_file() for f in ("pyproject.toml", "setup.cfg", "setup.py"))


def recipe_hashes(recipes: Mapping[str, Recipe], salt: str = "", extensions_digest: str = "absent",
                  ) -> dict[str, str]:
    """Hash of every recipe: its content + its base's hash (+ extensions tree
    digest where installed) + ``salt`` (the builder's script version).
    Recipes should be ``resolved()`` first so host pins count."""
    out: dict[str, str] = {}

    def one(name: str) -> str:
        if name in out:
            return out[name]
        r = recipes[name]
        doc = {"recipe": r.content(), "salt": salt,
               "base": ROOTFS if r.is_root else one(r.base)}
        if r.extensions:
            doc["extensions"] = extensions_digest
        out[name] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]
        return out[name]

    for n in recipes:
        one(n)
    return out


def python_mismatch(recipe: Recipe, image_python: str) -> str | None:
    """A message when the recipe needs another Python than its base image has."""
    if recipe.python and recipe.python != ".".join(image_python.split(".")[:2]):
        return (f"recipe {recipe.name!r} ({recipe.path or 'no file'}) needs Python {recipe.python}, "
                f"but its base {recipe.base!r} has Python {image_python}; its packages have no wheels "
                f"for that Python. Write a base recipe whose rootfs provides Python {recipe.python} "
                f"(e.g. an older Debian suite) and set base to it, or use a newer {recipe.framework} line.")
    return None
