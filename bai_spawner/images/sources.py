"""Where ``bai-images`` finds its recipes and the session-apps package.

Both come from configuration first (a command-line option, then an
environment variable), then from what is installed, never from a path
relative to this file:

* recipes: ``--recipes``, ``$BAI_RECIPES_DIR``, else the ``images`` folder
  shipped as package data of ``hub_config`` (``hub_config/images/``);
* extensions (the ``bai-session-apps`` source installed in every image):
  ``--extensions``, ``$BAI_EXTENSIONS_DIR``, else the folder the installed
  ``bai-session-apps`` distribution was installed from
  (``pip install -e ./extensions``, as ``scripts/setup.sh`` does; pip records
  it in the distribution's ``direct_url.json``).

Every subcommand resolves them the same way, so ``bai-images recipes`` shows
the hashes ``bai-images build`` uses.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

RECIPES_ENV = "BAI_RECIPES_DIR"
EXTENSIONS_ENV = "BAI_EXTENSIONS_DIR"
EXTENSIONS_DIST = "bai-session-apps"


class SourceError(LookupError):
    """A source folder cannot be found; the message says how to name it."""


def recipes_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get(RECIPES_ENV):
        return Path(os.environ[RECIPES_ENV])
    spec = importlib.util.find_spec("hub_config")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"no recipes folder: the hub_config package is not installed; "
                          f"pass --recipes DIR or set {RECIPES_ENV}")
    return Path(list(spec.submodule_search_locations)[0]) / "images"


def installed_source(dist: str) -> Path | None:
    """The local folder ``dist`` was installed from (PEP 610), if any."""
    try:
        text = importlib.metadata.distribution(dist).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    url = urlparse(info.get("url", ""))
    if url.scheme != "file" or "dir_info" not in info:
        return None
    return Path(unquote(url.path))


def extensions_dir(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get(EXTENSIONS_ENV):
        return Path(os.environ[EXTENSIONS_ENV])
    found = installed_source(EXTENSIONS_DIST)
    if found is None:
        raise SourceError(f"cannot find the {EXTENSIONS_DIST} source installed in every image: install it "
                          f"from its folder (pip install -e ./extensions), or pass --extensions DIR or set "
                          f"{EXTENSIONS_ENV}")
    return found
