"""``bai-images``: build kernel images from recipes without a container registry.

Pipeline for one recipe (see ``recipes.py`` for the recipe format):

1. The parent image: another recipe's image, or for a recipe with
   ``base = "rootfs"`` a Debian rootfs made by ``debootstrap`` (cached as a
   tarball) and ``docker import``-ed.
2. A wheelhouse on the host: ``pip download --only-binary=:all:`` for the
   parent image's Python/glibc/arch, using the host's pip configuration (index,
   mirror, CA bundle, constraints), cached under ``<cache>/wheels``.
3. A build container from the parent with the wheelhouse mounted read-only and
   no network: ``pip install --no-index --find-links``; then ``docker commit``
   with the image config (labels, env, user, entrypoint, cmd, workdir).
4. The recipe's ``test`` command runs in the new image; only then is it tagged
   ``<prefix><name>:<version>``.

Any failure removes the build container and the uncommitted/untested image:
nothing half-made is ever tagged. An image whose ``recipe-hash`` label matches
the recipe is up to date and not rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from .. import labels as L
from . import recipes as R

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPES = REPO_ROOT / "hub_config" / "images"
DEFAULT_EXTENSIONS = REPO_ROOT / "extensions"
DEFAULT_CACHE = "/var/cache/bai-hub"
DEFAULT_PREFIX = "bai/"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

# Paths and identity inside every image (the spawner relies on these).
VENV = "/opt/bai/venv"
EXTRA_VENVS_DIR = "/opt/bai"
NB_USER, NB_UID, NB_GID, NB_HOME = "jovyan", 1000, 100, "/home/jovyan"
PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MLFLOW_BIN = "/opt/bai/mlflow/bin/mlflow"
BUILD_MNT = "/tmp/.bai-build"   # wheelhouse and script are mounted below this, read-only

ROOTFS_VARIANT = "minbase"

_ROOT_SCRIPT = r"""set -eu
echo "[bai] user {user} ({uid}:{gid}), home {home}"
id -u {user} >/dev/null 2>&1 || useradd --create-home --home-dir {home} --uid {uid} --gid {gid} --shell /bin/bash {user}
mkdir -p /opt/bai
echo "[bai] venv {venv}"
# --system-site-packages keeps the user site enabled: `pip install --user X`
# goes to ~/.local (the home volume) and shadows the image's packages.
python3 -m venv --system-site-packages {venv}
{venv}/bin/pip install {pipflags} --find-links {mnt}/wheels/venv --find-links {mnt}/script/ext-wheels {venv_specs}
{extra_venvs}
chown -R {uid}:{gid} {venv} {home}
rm -rf /root/.cache /var/cache/apt/archives/*.deb /var/lib/apt/lists/*
echo "[bai] done"
"""

_EXTRA_VENV = r"""echo "[bai] venv {path}"
python3 -m venv {path}
{path}/bin/pip install {pipflags} --find-links {mnt}/wheels/{name} {specs}
ln -sf {path}/bin/{name} /usr/local/bin/{name}-server 2>/dev/null || true
"""

_DERIVED_SCRIPT = r"""set -eu
{venv}/bin/pip install {pipflags} --find-links {mnt}/wheels/venv {constraints} {specs}
echo "[bai] done"
"""

_PROBE = r"""
import importlib.metadata as md, json, platform, sys
libc = platform.libc_ver()
print(json.dumps({
    "python": "%d.%d.%d" % sys.version_info[:3],
    "libc": libc[0], "libc_version": libc[1], "machine": platform.machine(),
    "freeze": sorted({"%s==%s" % (d.metadata["Name"], d.version) for d in md.distributions()
                      if d.metadata["Name"]}),
}))
"""

PIPFLAGS = "--no-index --no-cache-dir --disable-pip-version-check --no-warn-script-location --progress-bar off"

# Salt for recipe hashes: changes to the build procedure rebuild everything.
BUILDER_SALT = hashlib.sha256(
    (_ROOT_SCRIPT + _EXTRA_VENV + _DERIVED_SCRIPT + PATH + MLFLOW_BIN + "v1").encode()
).hexdigest()[:12]


class BuildError(RuntimeError):
    """A build step failed; the message says which and what to do."""


def log(msg: str) -> None:
    print(msg, flush=True)


def docker_client():
    """A docker client that answered ping, or a BuildError saying how to fix it."""
    import docker
    url = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
        return client
    except Exception as e:
        raise BuildError(f"Cannot reach the Docker engine at {url}: start dockerd or set "
                         f"DOCKER_HOST ({type(e).__name__}: {e})") from None


def host_version(dist: str) -> str:
    return importlib.metadata.version(dist)


def load_resolved(recipes_dir) -> dict[str, R.Recipe]:
    recipes = R.load_recipes(recipes_dir)
    return {n: r.resolved(host_version) for n, r in recipes.items()}


def manylinux_platforms(libc_version: str, machine: str) -> list[str]:
    """pip --platform values a glibc ``libc_version`` system on ``machine`` accepts."""
    try:
        major, minor = (int(x) for x in libc_version.split(".")[:2])
    except ValueError:
        major, minor = 2, 17
    plats = [f"manylinux_{major}_{m}_{machine}" for m in range(minor, 4, -1)]
    if machine in ("x86_64", "i686"):
        if minor >= 17:
            plats.append(f"manylinux2014_{machine}")
        if minor >= 12:
            plats.append(f"manylinux2010_{machine}")
        if minor >= 5:
            plats.append(f"manylinux1_{machine}")
    elif minor >= 17:
        plats.append(f"manylinux2014_{machine}")
    plats.append(f"linux_{machine}")
    return plats


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in s).strip("-.")


class Builder:
    def __init__(self, client=None, recipes_dir=DEFAULT_RECIPES, cache_dir=None, prefix=None,
                 extensions_dir=None, mirror=None, verbose=False, out: Callable[[str], None] = log):
        self.recipes_dir = Path(recipes_dir)
        self.cache_dir = Path(cache_dir or os.environ.get("BAI_CACHE_DIR") or DEFAULT_CACHE)
        self.prefix = prefix if prefix is not None else os.environ.get("BAI_IMAGE_PREFIX", DEFAULT_PREFIX)
        self.extensions_dir = Path(extensions_dir or os.environ.get("BAI_EXTENSIONS_DIR")
                                   or DEFAULT_EXTENSIONS)
        self.mirror = mirror or os.environ.get("BAI_DEBIAN_MIRROR") or DEFAULT_MIRROR
        self.verbose = verbose
        self.out = out
        self.recipes = load_resolved(self.recipes_dir)
        ext = R.tree_digest(self.extensions_dir) if R.is_installable(self.extensions_dir) else "absent"
        self.ext_digest = ext
        self.hashes = R.recipe_hashes(self.recipes, salt=BUILDER_SALT, extensions_digest=ext)
        self._client = client

    # ------------------------------------------------------------------ engine
    @property
    def client(self):
        if self._client is None:
            self._client = docker_client()
        return self._client

    @property
    def api(self):
        return self.client.api

    def ref(self, name: str) -> str:
        return self.recipes[name].image_ref(self.prefix)

    def find_built(self, name: str) -> dict | None:
        """An image on the engine built from this exact recipe (any tag), preferring our tag."""
        want = self.hashes[name]
        try:
            attrs = self.api.inspect_image(self.ref(name))
            if (attrs.get("Config") or {}).get("Labels", {}).get(L.RECIPE_HASH) == want:
                return attrs
        except Exception:
            pass
        found = self.api.images(filters={"label": [f"{L.NAME}={name}", f"{L.RECIPE_HASH}={want}"]})
        return found[0] if found else None

    # ------------------------------------------------------------------ build
    def build(self, names: list[str] | None = None) -> dict[str, str]:
        """Build ``names`` (default: recipes with default = true) and their
        bases. Returns ``{name: image id}`` for everything in the build order."""
        names = list(names) if names else R.default_names(self.recipes)
        for n in names:
            if n not in self.recipes:
                raise BuildError(f"no recipe named {n!r} in {self.recipes_dir}; "
                                 f"known: {', '.join(sorted(self.recipes))}")
        order = R.build_order(self.recipes, names)
        self.client  # fail early when the engine is down
        ids: dict[str, str] = {}
        for n in order:
            t0 = time.monotonic()
            r = self.recipes[n]
            ref = self.ref(n)
            built = self.find_built(n)
            if built is not None:
                iid = built.get("Id")
                if n in names and ref not in (built.get("RepoTags") or []):
                    self.api.tag(iid, *ref.rsplit(":", 1))
                    self.out(f"{ref}: up to date (tagged existing image {iid[7:19]})")
                else:
                    self.out(f"{ref}: up to date")
                ids[n] = iid
                continue
            parent = self.rootfs_image(r) if r.is_root else ids[r.base]
            self.out(f"{ref}: building (recipe hash {self.hashes[n]}) on "
                     f"{'debootstrap rootfs' if r.is_root else self.ref(r.base)}")
            ids[n] = self.build_one(r, parent)
            self.out(f"{ref}: built in {time.monotonic() - t0:.0f}s")
        return ids

    # ------------------------------------------------------------------ rootfs
    def rootfs_key(self, r: R.Recipe) -> str:
        doc = {"suite": r.suite, "variant": ROOTFS_VARIANT, "include": sorted(set(r.apt)), "v": 1}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def rootfs_image(self, r: R.Recipe) -> str:
        key = self.rootfs_key(r)
        found = self.api.images(filters={"label": [f"{L.NAME}=rootfs", f"{L.RECIPE_HASH}={key}"]})
        if found:
            return found[0]["Id"]
        tar = self.cache_dir / f"rootfs-{r.suite}-{key}.tar"
        if not tar.exists():
            self.debootstrap(r, tar)
        repo, tag = f"{self.prefix}rootfs", f"{r.suite}-{key}"
        self.out(f"importing {tar} as {repo}:{tag}")
        changes = [f"LABEL {json.dumps(L.NAME)}=\"rootfs\"", f"LABEL {json.dumps(L.RECIPE_HASH)}=\"{key}\"",
                   f"ENV PATH={PATH}", "ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]']
        try:
            self.api.import_image_from_file(str(tar), repository=repo, tag=tag, changes=changes)
            return self.api.inspect_image(f"{repo}:{tag}")["Id"]
        except Exception as e:
            raise BuildError(f"docker import of {tar} failed: {e}; delete the tarball to "
                             f"re-run debootstrap") from None

    def debootstrap(self, r: R.Recipe, tar: Path) -> None:
        if shutil.which("debootstrap") is None:
            raise BuildError("debootstrap is not installed: apt-get install debootstrap")
        if os.geteuid() != 0:
            raise BuildError("debootstrap needs root: run `bai-images build` as root "
                             f"(once; the rootfs is cached in {self.cache_dir})")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=self.cache_dir))
        root = work / "root"
        try:
            cmd = ["debootstrap", f"--variant={ROOTFS_VARIANT}", f"--include={','.join(r.apt)}",
                   r.suite, str(root), self.mirror]
            self.out(f"debootstrap: {' '.join(cmd)}")
            t0 = time.monotonic()
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if p.returncode != 0:
                tail = "\n".join(p.stdout.splitlines()[-15:])
                raise BuildError(f"debootstrap failed (exit {p.returncode}); check the package names in "
                                 f"{r.path} field 'apt' and the mirror {self.mirror} "
                                 f"(BAI_DEBIAN_MIRROR):\n{tail}")
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for f in (root / junk).glob("*"):
                    if f.is_file():
                        f.unlink()
            partial = tar.with_suffix(".tar.partial")
            p = subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if p.returncode != 0:
                partial.unlink(missing_ok=True)
                raise BuildError(f"packing the rootfs failed: {p.stdout[-2000:]}")
            partial.rename(tar)
            self.out(f"debootstrap: rootfs cached at {tar} ({time.monotonic() - t0:.0f}s)")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------ helpers
    def run_in(self, image: str, command: list[str], entrypoint=None, user=None, network="none",
               timeout: float = 600) -> tuple[int, str]:
        """Run a throwaway container; returns (exit code, output). Always removed."""
        c = self.api.create_container(
            image, command=command, entrypoint=entrypoint, user=user,
            name=f"{_safe(self.prefix)}-run-{uuid.uuid4().hex[:8]}",
            host_config=self.api.create_host_config(network_mode=network))
        cid = c["Id"]
        try:
            self.api.start(cid)
            rc = self.api.wait(cid, timeout=timeout)["StatusCode"]
            out = self.api.logs(cid, stdout=True, stderr=True).decode(errors="replace")
            return rc, out
        finally:
            self.api.remove_container(cid, force=True)

    def probe(self, image: str, python: str) -> dict:
        rc, out = self.run_in(image, [python, "-c", _PROBE])
        if rc != 0:
            raise BuildError(f"cannot run {python} in image {image[:19]} (exit {rc}): {out[-1500:]}")
        return json.loads(out.strip().splitlines()[-1])

    @staticmethod
    def pip_download_cmd(info: dict, dest: Path) -> list[str]:
        """``pip download`` of wheels for the image's Python, glibc and arch
        (the host's pip configuration applies: index, mirror, CA bundle)."""
        py = ".".join(info["python"].split(".")[:2])
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", py, "--implementation", "cp",
               "--abi", f"cp{py.replace('.', '')}", "-d", str(dest)]
        for p in manylinux_platforms(info["libc_version"], info["machine"]):
            cmd += ["--platform", p]
        return cmd

    def extension_deps(self, ext: list[str], info: dict, wheelhouse: Path, dest: Path,
                       specs: list[str]) -> None:
        """The extensions wheel and any dependency the cached wheelhouse lacks,
        into ``dest`` (per build: the extensions change often, the rest rarely).
        Offline from the wheelhouse first; the index only when that fails."""
        base = self.pip_download_cmd(info, dest) + ["--find-links", str(wheelhouse), *specs, *ext]
        p = subprocess.run(base[:4] + ["--no-index"] + base[4:], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            p = subprocess.run(base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0:
            raise BuildError(f"the dependencies of {self.extensions_dir} cannot be downloaded as "
                             f"wheels; fix its pyproject.toml:\n{p.stdout[-2000:]}")

    def wheelhouse(self, r: R.Recipe, envs: dict[str, list[str]], info: dict,
                   constraints: list[str]) -> Path:
        """Download wheels for ``envs`` (``{env: [requirements]}``) into a cached
        directory ``<cache>/wheels/<name>-<key>/<env>/``."""
        py = ".".join(info["python"].split(".")[:2])
        plats = manylinux_platforms(info["libc_version"], info["machine"])
        key = hashlib.sha256(json.dumps([envs, py, plats, constraints]).encode()).hexdigest()[:16]
        root = self.cache_dir / "wheels"
        final = root / f"{r.name}-{key}"
        if (final / ".complete").exists():
            self.out(f"  wheelhouse {final} (cached)")
            return final
        root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{r.name}-", dir=root))
        os.chmod(work, 0o755)
        try:
            (work / "constraints.txt").write_text("".join(c + "\n" for c in constraints))
            for env, specs in envs.items():
                cmd = self.pip_download_cmd(info, work / env)
                if constraints:
                    cmd += ["-c", str(work / "constraints.txt")]
                cmd += specs
                self.out(f"  pip download ({env}): {' '.join(specs)}")
                t0 = time.monotonic()
                p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                if p.returncode != 0:
                    tail = "\n".join(p.stdout.splitlines()[-12:])
                    raise BuildError(
                        f"{r.name}: pip download failed for {' '.join(specs)} (Python {py}, "
                        f"{plats[0]}); check the versions in {r.path} field 'packages' exist as "
                        f"wheels for this Python and the host pip index is reachable:\n{tail}")
                n = len(list((work / env).glob("*.whl")))
                self.out(f"  pip download ({env}): {n} wheels in {time.monotonic() - t0:.0f}s")
            (work / ".complete").write_text(json.dumps(envs))
            for old in root.glob(f"{r.name}-*"):
                if old.is_dir() and old.name != final.name and not old.name.startswith("."):
                    shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            work.rename(final)
            return final
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def extension_wheels(self, r: R.Recipe, scratch: Path) -> list[str]:
        if not (r.extensions and R.is_installable(self.extensions_dir)):
            return []
        out = scratch / "ext"
        out.mkdir()
        # Copy first so the build leaves no build/ or egg-info in the repository.
        src = scratch / "ext-src"
        shutil.copytree(self.extensions_dir, src, ignore=shutil.ignore_patterns(
            "build", "dist", "*.egg-info", "__pycache__", ".*"))
        cmd = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
               "-w", str(out), str(src)]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = sorted(str(w) for w in out.glob("*.whl"))
        if p.returncode != 0 or not wheels:
            raise BuildError(f"building a wheel of {self.extensions_dir} failed; fix the package "
                             f"there:\n{p.stdout[-2000:]}")
        self.out(f"  extensions: {Path(wheels[0]).name}")
        return wheels

    # ------------------------------------------------------------------ one recipe
    def build_one(self, r: R.Recipe, parent: str) -> str:
        api = self.api
        info = self.probe(parent, "python3" if r.is_root else f"{VENV}/bin/python")
        msg = R.python_mismatch(r, info["python"])
        if msg:
            raise BuildError(msg)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / "tmp").mkdir(exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{r.name}-", dir=self.cache_dir / "tmp"))
        os.chmod(scratch, 0o755)
        (scratch / "ext-wheels").mkdir()
        cid = image_id = None
        tagged = False
        try:
            pins = {n.lower().replace("_", "-") for n in r.requirement_names()}
            constraints = [] if r.is_root else [
                c for c in info["freeze"] if c.split("==")[0].lower().replace("_", "-") not in pins]
            envs = {"venv": list(r.packages)}
            envs.update({n: list(specs) for n, specs in r.venvs})
            ext = self.extension_wheels(r, scratch)
            wheels = self.wheelhouse(r, envs, info, constraints)
            if ext:
                self.extension_deps(ext, info, wheels / "venv", scratch / "ext-wheels", list(r.packages))
            q = lambda specs: " ".join(shlex.quote(s) for s in specs)
            if r.is_root:
                ext_specs = [f"{BUILD_MNT}/script/ext-wheels/{Path(w).name}" for w in ext]
                extra = "".join(_EXTRA_VENV.format(path=f"{EXTRA_VENVS_DIR}/{n}", name=n, mnt=BUILD_MNT,
                                                   pipflags=PIPFLAGS, specs=q(specs))
                                for n, specs in r.venvs)
                script = _ROOT_SCRIPT.format(user=NB_USER, uid=NB_UID, gid=NB_GID, home=NB_HOME, venv=VENV,
                                             mnt=BUILD_MNT, pipflags=PIPFLAGS,
                                             venv_specs=q(list(r.packages) + ext_specs), extra_venvs=extra)
                user = "0:0"
            else:
                script = _DERIVED_SCRIPT.format(venv=VENV, pipflags=PIPFLAGS, mnt=BUILD_MNT,
                                                constraints=f"-c {BUILD_MNT}/wheels/constraints.txt"
                                                if constraints else "", specs=q(list(r.packages)))
                user = f"{NB_UID}:{NB_GID}"
            (scratch / "build.sh").write_text(script)
            host_config = api.create_host_config(
                network_mode="none",
                binds={str(wheels): {"bind": f"{BUILD_MNT}/wheels", "mode": "ro"},
                       str(scratch): {"bind": f"{BUILD_MNT}/script", "mode": "ro"}})
            name = f"{_safe(self.prefix)}-build-{r.name}-{uuid.uuid4().hex[:6]}"
            cid = api.create_container(parent, command=["/bin/sh", f"{BUILD_MNT}/script/build.sh"],
                                       user=user, name=name,
                                       host_config=host_config)["Id"]
            t0 = time.monotonic()
            api.start(cid)
            lines: list[str] = []
            buf = b""
            for chunk in api.logs(cid, stream=True, follow=True):
                buf += chunk
                *done, buf = buf.split(b"\n")
                for raw in done:
                    line = raw.decode(errors="replace")
                    lines.append(line)
                    if self.verbose or line.startswith(("[bai]", "Successfully installed")):
                        self.out(f"  | {line[:300]}")
            if buf:
                lines.append(buf.decode(errors="replace"))
            rc = api.wait(cid)["StatusCode"]
            if rc != 0:
                raise BuildError(f"{r.name}: installing packages in the build container failed "
                                 f"(exit {rc}); see the pip output below and fix {r.path}:\n"
                                 + "\n".join(lines[-25:]))
            self.out(f"  installed in {time.monotonic() - t0:.0f}s")
            python = ".".join(info["python"].split(".")[:2])
            image_id = api.commit(cid, changes=self.commit_changes(r, python))["Id"]
            api.remove_container(cid, force=True)
            cid = None
            if r.test:
                rc, out = self.run_in(image_id, ["/bin/sh", "-c", r.test])
                if rc != 0:
                    raise BuildError(f"{r.name}: the recipe's test failed (exit {rc}) in the new image: "
                                     f"{r.test}\n{out[-2000:]}")
                self.out(f"  test ok: {r.test}")
            ref = self.ref(r.name)
            old = None
            try:
                old = api.inspect_image(ref)["Id"]
            except Exception:
                pass
            api.tag(image_id, *ref.rsplit(":", 1))
            tagged = True
            if old and old != image_id:
                try:
                    if not api.inspect_image(old).get("RepoTags"):
                        api.remove_image(old)
                except Exception:
                    pass  # still used by a container or a child image; leave it
            for stale in self.cache_dir.glob(f"wheels/.{r.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            return image_id
        finally:
            if cid is not None:
                try:
                    api.remove_container(cid, force=True)
                except Exception:
                    pass
            if image_id is not None and not tagged:
                try:
                    api.remove_image(image_id, force=True)
                except Exception:
                    pass
            shutil.rmtree(scratch, ignore_errors=True)

    def commit_changes(self, r: R.Recipe, python: str) -> list[str]:
        labels = {
            L.KIND: r.kind, L.NAME: r.name, L.FRAMEWORK: r.framework, L.VERSION: r.version,
            L.DISPLAY_NAME: r.display_name, L.PYTHON: python, L.RECIPE_HASH: self.hashes[r.name],
        }
        changes = [f"LABEL {json.dumps(k)}={json.dumps(v)}" for k, v in labels.items()]
        changes += [
            f"ENV PATH={PATH}", "ENV LANG=C.UTF-8", f"ENV BAI_MLFLOW_BIN={MLFLOW_BIN}",
            f"ENV HOME={NB_HOME}", f"USER {NB_USER}", f"WORKDIR {NB_HOME}",
            'ENTRYPOINT ["tini", "-g", "--"]', 'CMD ["jupyterhub-singleuser"]',
        ]
        return changes


# ---------------------------------------------------------------------- listing
def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def list_table(client, show_all: bool = False) -> str:
    from ..catalog import build_catalog, list_images_blocking
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
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def recipes_table(recipes: dict[str, R.Recipe], hashes: dict[str, str], prefix: str) -> str:
    rows = [("NAME", "IMAGE", "FRAMEWORK", "VERSION", "BASE", "DEFAULT", "HASH")]
    for n, r in sorted(recipes.items()):
        rows.append((n, r.image_ref(prefix), r.framework, r.version, r.base,
                     "yes" if r.default else "no", hashes[n]))
    widths = [max(len(str(r[k])) for r in rows) for k in range(len(rows[0]))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bai-images", description="Build and list BAI Hub kernel images.")
    ap.add_argument("--recipes", default=os.environ.get("BAI_RECIPES_DIR", str(DEFAULT_RECIPES)),
                    help="recipes directory (env BAI_RECIPES_DIR; default %(default)s)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build images (default: every recipe with default = true)")
    b.add_argument("names", nargs="*", metavar="NAME", help="recipe names; their bases are built too")
    b.add_argument("--prefix", default=None,
                   help=f"image name prefix (env BAI_IMAGE_PREFIX; default {DEFAULT_PREFIX!r})")
    b.add_argument("--cache-dir", default=None,
                   help=f"rootfs tarballs and wheelhouses (env BAI_CACHE_DIR; default {DEFAULT_CACHE})")
    b.add_argument("--extensions", default=None,
                   help=f"extensions package installed in the base (env BAI_EXTENSIONS_DIR; "
                        f"default {DEFAULT_EXTENSIONS})")
    b.add_argument("--mirror", default=None, help=f"Debian mirror (env BAI_DEBIAN_MIRROR; default {DEFAULT_MIRROR})")
    b.add_argument("-v", "--verbose", action="store_true", help="show all pip output")
    ls = sub.add_parser("list", help="catalog images on the Docker engine")
    ls.add_argument("--all", action="store_true", help="also show base images")
    rp = sub.add_parser("recipes", help="recipes and their hashes")
    rp.add_argument("--prefix", default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            t0 = time.monotonic()
            builder = Builder(recipes_dir=args.recipes, cache_dir=args.cache_dir, prefix=args.prefix,
                              extensions_dir=args.extensions, mirror=args.mirror, verbose=args.verbose)
            builder.build(args.names)
            log(f"done in {time.monotonic() - t0:.0f}s")
        elif args.cmd == "list":
            print(list_table(docker_client(), show_all=args.all))
        elif args.cmd == "recipes":
            recipes = load_resolved(args.recipes)
            ext = R.tree_digest(DEFAULT_EXTENSIONS) if R.is_installable(DEFAULT_EXTENSIONS) else "absent"
            hashes = R.recipe_hashes(recipes, salt=BUILDER_SALT, extensions_digest=ext)
            prefix = args.prefix if args.prefix is not None else os.environ.get("BAI_IMAGE_PREFIX", DEFAULT_PREFIX)
            print(recipes_table(recipes, hashes, prefix))
    except (BuildError, R.RecipeError) as e:
        print(f"bai-images: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bai-images: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
