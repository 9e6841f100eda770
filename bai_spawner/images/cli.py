"""``bai-images``: build and list kernel images.

    bai-images build [NAME...]   build recipes (default: those with default = true) and their bases
    bai-images list [--all]      the catalog the spawn form offers, read from the images' labels
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
from . import recipes as R
from . import sources
from .builder import DEFAULT_CACHE, DEFAULT_MIRROR, DEFAULT_PREFIX, BuildError, Builder, docker_client, plan


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def list_table(client, show_all: bool = False) -> str:
    from bai_scheduler.contract.catalog import build_catalog, list_images_blocking
    images = list_images_blocking(client)
    rows = [("DISPLAY NAME", "IMAGE", "FRAMEWORK", "VERSION", "PYTHON", "KIND", "SIZE")]
    for c in build_catalog(images):
        rows.append((c.display_name, c.ref, c.framework, c.version, c.python,
                     c.kind + (f" ({c.owner})" if c.owner else ""), _gib(c.size)))
    if show_all:
        for i in images:
            lab = i.get("Labels") or {}
            if lab.get(L.KIND) == R.KIND_BASE:
                tags = [t for t in i.get("RepoTags") or [] if t != "<none>:<none>"]
                rows.append((lab.get(L.DISPLAY_NAME, ""), tags[0] if tags else i["Id"][:19],
                             lab.get(L.FRAMEWORK, ""), lab.get(L.VERSION, ""), lab.get(L.PYTHON, ""),
                             "base", _gib(int(i.get("Size") or 0))))
    return _table(rows)


def recipes_table(recipes: dict[str, R.Recipe], hashes: dict[str, str], prefix: str) -> str:
    rows = [("NAME", "IMAGE", "FRAMEWORK", "VERSION", "BASE", "DEFAULT", "HASH")]
    for n, r in sorted(recipes.items()):
        rows.append((n, r.image_ref(prefix), r.framework, r.version, r.base,
                     "yes" if r.default else "no", hashes[n]))
    return _table(rows)


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
    ap = argparse.ArgumentParser(prog="bai-images", description="Build and list BAI Hub kernel images.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", parents=[sources_args],
                       help="build images (default: every recipe with default = true)")
    b.add_argument("names", nargs="*", metavar="NAME", help="recipe names; their bases are built too")
    b.add_argument("--cache-dir", default=None,
                   help=f"rootfs tarballs and wheelhouses (env BAI_CACHE_DIR; default {DEFAULT_CACHE})")
    b.add_argument("--mirror", default=None, help=f"Debian mirror (env BAI_DEBIAN_MIRROR; default {DEFAULT_MIRROR})")
    b.add_argument("-v", "--verbose", action="store_true", help="show all pip output")
    ls = sub.add_parser("list", help="catalog images on the Docker engine")
    ls.add_argument("--all", action="store_true", help="also show base images")
    sub.add_parser("recipes", parents=[sources_args], help="recipes, their images and hashes")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            signal.signal(signal.SIGTERM, _interrupted)
            t0 = time.monotonic()
            builder = Builder(recipes_dir=args.recipes, cache_dir=args.cache_dir, prefix=args.prefix,
                              extensions_dir=args.extensions, mirror=args.mirror, verbose=args.verbose)
            builder.build(args.names)
            print(f"done in {time.monotonic() - t0:.0f} s", flush=True)
        elif args.cmd == "list":
            print(list_table(docker_client(), show_all=args.all))
        elif args.cmd == "recipes":
            _, _, recipes, hashes = plan(args.recipes, args.extensions)
            prefix = args.prefix if args.prefix is not None else os.environ.get("BAI_IMAGE_PREFIX", DEFAULT_PREFIX)
            print(recipes_table(recipes, hashes, prefix))
    except (BuildError, R.RecipeError) as e:
        print(f"bai-images: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bai-images: interrupted; nothing half-built was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
