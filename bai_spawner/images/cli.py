"""``bai-images``: build and list kernel images.

    bai-images build [NAME...]   build recipes (default: those with default = true) and their bases,
                                 and push them to the image registry
    bai-images list [--all]      the catalog the spawn form offers, read from the registry
    bai-images recipes           recipes, their images and hashes

``build`` and ``recipes`` find the recipes and the session-apps source the
same way (``sources.py``), so the hashes ``recipes`` shows are the ones
``build`` looks for.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from bai_scheduler.contract import labels as L
from bai_scheduler.contract.catalog import catalog_from_registry
from bai_scheduler.contract.registry import DEFAULT_URL, BaiRegistry, RegistryError
from . import recipes as R
from . import sources
from .builder import DEFAULT_CACHE, DEFAULT_MIRROR, DEFAULT_PREFIX, BuildError, Builder, plan


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def list_table(registry: BaiRegistry, show_all: bool = False) -> str:
    """The catalog in the registry (sizes: what a node downloads, compressed)."""
    images = registry.client().images()
    rows = [("DISPLAY NAME", "IMAGE", "FRAMEWORK", "VERSION", "PYTHON", "KIND", "DOWNLOAD")]
    for c in catalog_from_registry(images, registry.host):
        rows.append((c.display_name, c.short_ref, c.framework, c.version, c.python,
                     c.kind + (f" ({c.owner})" if c.owner else ""), _gib(c.size)))
    if show_all:
        for i in images:
            if i.labels.get(L.KIND) == R.KIND_BASE:
                rows.append((i.labels.get(L.DISPLAY_NAME, ""), f"{i.repository}:{i.tag}", i.labels.get(L.FRAMEWORK, ""),
                             i.labels.get(L.VERSION, ""), i.labels.get(L.PYTHON, ""), "base", _gib(i.size)))
    return _table(rows)


def recipes_table(recipes: dict[str, R.Recipe], hashes: dict[str, str], prefix: str) -> str:
    rows = [("NAME", "IMAGE", "FRAMEWORK", "VERSION", "BASE", "DEFAULT", "HASH")]
    for n, r in sorted(recipes.items()):
        rows.append((n, r.image_ref(prefix), r.framework, r.version, r.base,
                     "yes" if r.default else "no", hashes[n]))
    return _table(rows)


def registry_of(args) -> BaiRegistry:
    """The registry named by --registry, else BAI_REGISTRY_URL, else the local default."""
    try:
        return BaiRegistry(url=args.registry or os.environ.get("BAI_REGISTRY_URL") or DEFAULT_URL)
    except Exception as e:  # a malformed URL (traitlets' validation)
        raise BuildError(str(e)) from None


def _interrupted(signum, frame):
    # a terminated build cleans up like an interrupted one (no half-made image)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    sources_args = argparse.ArgumentParser(add_help=False)
    sources_args.add_argument("--recipes", default=None,
                              help=f"recipes folder (env {sources.RECIPES_ENV}; default: hub_config/images "
                                   f"of the installed hub_config package)")
    sources_args.add_argument("--extensions", default=None,
                              help=f"bai-session-apps source installed in every image (env "
                                   f"{sources.EXTENSIONS_ENV}; default: where the installed "
                                   f"{sources.EXTENSIONS_DIST} came from)")
    sources_args.add_argument("--prefix", default=None,
                              help=f"image name prefix (env BAI_IMAGE_PREFIX; default {DEFAULT_PREFIX!r})")
    registry_args = argparse.ArgumentParser(add_help=False)
    registry_args.add_argument("--registry", default=None,
                               help=f"the image registry (env BAI_REGISTRY_URL; default {DEFAULT_URL}); its login: "
                                    "`docker login <host>` on this machine")
    ap = argparse.ArgumentParser(prog="bai-images", description="Build and list BAI Hub kernel images.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", parents=[sources_args, registry_args],
                       help="build images (default: every recipe with default = true) and push them")
    b.add_argument("names", nargs="*", metavar="NAME", help="recipe names; their bases are built too")
    b.add_argument("--cache-dir", default=None,
                   help=f"rootfs tarballs and wheelhouses (env BAI_CACHE_DIR; default {DEFAULT_CACHE})")
    b.add_argument("--mirror", default=None, help=f"Debian mirror (env BAI_DEBIAN_MIRROR; default {DEFAULT_MIRROR})")
    b.add_argument("-v", "--verbose", action="store_true", help="show all pip output")
    b.add_argument("--no-push", action="store_true", help="build on this engine only (no registry)")
    ls = sub.add_parser("list", parents=[registry_args], help="catalog images in the registry")
    ls.add_argument("--all", action="store_true", help="also show base images")
    sub.add_parser("recipes", parents=[sources_args], help="recipes, their images and hashes")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            signal.signal(signal.SIGTERM, _interrupted)
            t0 = time.monotonic()
            builder = Builder(recipes_dir=args.recipes, cache_dir=args.cache_dir, prefix=args.prefix,
                              extensions_dir=args.extensions, mirror=args.mirror, verbose=args.verbose,
                              registry=None if args.no_push else registry_of(args))
            builder.build(args.names)
            print(f"done in {time.monotonic() - t0:.0f} s", flush=True)
        elif args.cmd == "list":
            print(list_table(registry_of(args), show_all=args.all))
        elif args.cmd == "recipes":
            _, _, recipes, hashes = plan(args.recipes, args.extensions)
            prefix = args.prefix if args.prefix is not None else os.environ.get("BAI_IMAGE_PREFIX", DEFAULT_PREFIX)
            print(recipes_table(recipes, hashes, prefix))
    except (BuildError, R.RecipeError) as e:
        print(f"bai-images: error: {e}", file=sys.stderr)
        return 1
    except RegistryError as e:
        print(f"bai-images: error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bai-images: interrupted; nothing half-built was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
