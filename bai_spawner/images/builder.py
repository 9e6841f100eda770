"""Build kernel images from recipes, and push them to the image registry.

Steps for one recipe (see ``recipes.py`` for the format, ``layout.py`` for
what lies where in an image), each reported as a ``Progress`` event:

1. ``rootfs`` (a recipe on "rootfs" only): a Debian rootfs made by
   ``debootstrap`` (cached as a tarball) and ``docker import``-ed.
2. ``check``: the parent image's Python, glibc and architecture; a recipe that
   needs another Python stops here.
3. ``download``: a wheelhouse on the host, ``pip download --only-binary=:all:``
   for that Python/glibc/arch with the host's pip configuration (index,
   mirror, CA bundle, constraints), cached under ``<cache>/wheels``. Packages
   found and bytes fetched are reported as they come.
4. ``install``, ``compile``, ``kernelspec``: a build container from the parent
   with the wheelhouse mounted read-only and no network. A recipe on "rootfs"
   makes the server environment (and its ``venvs``); a kernel recipe makes the
   kernel environment as the user, from the base's ``kernel_packages`` and its
   own packages, and registers it as the default kernel. Bytes written into
   each environment are reported against the wheels' unpacked size.
5. ``commit`` with the image config (labels, env, user, entrypoint, cmd).
6. ``test``: the recipe's test command runs in the new image, without network.
   Only then is the image tagged ``<prefix><image>:<version>``.
7. ``push`` (with a registry): tagged ``<registry host>/<prefix><image>:<version>`` and pushed,
   the bytes reported as they go; every node pulls it from there. An image the registry already
   holds under that name (the same image id) is not pushed again (step ``registry``).

Any failure names the recipe, the step and the reason, and removes the build
container and the uncommitted or untested image: nothing half-made is ever
tagged, and the catalog is unchanged. An image whose ``recipe-hash`` label
matches the recipe is up to date and not rebuilt. A failed push leaves the
tested image tagged on this engine only; the next build pushes it.
"""

from __future__ import annotations

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
import zipfile
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

from bai_scheduler.contract import labels as L
from bai_scheduler.contract.registry import RegistryError, split_name
from bai_scheduler.contract.transfer import Transfer, TransferFailed
from . import layout as Y
from . import recipes as R
from . import sources
from .progress import DownloadMeter, Progress, install_detail, megabytes, script_event

DEFAULT_CACHE = "/var/cache/bai-hub"
DEFAULT_PREFIX = "bai/"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_MNT = "/tmp/.bai-build"   # wheelhouse and script are mounted below this, read-only
ROOTFS_VARIANT = "minbase"
# Seconds one engine call may take: committing or removing a container with a
# multi-GB layer takes minutes on a busy engine (docker-py's default is 60).
ENGINE_TIMEOUT = 900

# pip compiles nothing while installing (the install step's byte count then
# matches the wheels' unpacked size); compile_env does it on every core.
PIPFLAGS = ("--no-index --no-cache-dir --no-compile --disable-pip-version-check "
            "--no-warn-script-location --progress-bar off")

_FUNCTIONS = r"""# install_env ENV "FIND-LINKS/CONSTRAINT OPTIONS" REQUIREMENT...:
# pip install into ENV, printing the bytes written so far every second.
install_env() {{
  env=$1; opts=$2; shift 2
  start=$(du -sb "$env" | cut -f1)
  "$env/bin/pip" install {pipflags} $opts "$@" &
  pid=$!
  while kill -0 $pid 2>/dev/null; do
    sleep 1
    now=$(du -sb "$env" 2>/dev/null | cut -f1)
    echo "[bai] bytes $(basename "$env") $(( ${{now:-$start}} - start ))"
  done
  wait $pid
}}
# Like pip's own compile step, a file that does not compile is left as it is.
compile_env() {{
  "$1/bin/python" -m compileall -q -j 0 "$1/lib" >/dev/null 2>&1 || true
}}
"""

_ROOT_SCRIPT = r"""set -eu
{functions}
id -u {user} >/dev/null 2>&1 || useradd --create-home --home-dir {home} --uid {uid} --gid {gid} --shell {shell} {user}
mkdir -p {envs_dir}
echo "[bai] step install server"
# no --system-site-packages: the user site stays off, so `pip install --user`
# in a session cannot change the server's packages
python3 -m venv {server}
install_env {server} "--find-links {mnt}/wheels/server --find-links {mnt}/script/ext-wheels" {server_specs}
{extra_venvs}echo "[bai] step compile"
{compile}
# Made by each kernel recipe, as the user: `pip install X` in a session lands there.
install -d -o {uid} -g {gid} {kernel}
cat > {profile_script} <<'BAI_PROFILE'
{profile}BAI_PROFILE
chown -R {uid}:{gid} {home}
rm -rf /root/.cache /var/cache/apt/archives/*.deb /var/lib/apt/lists/*
echo "[bai] done"
"""

_EXTRA_VENV = r"""echo "[bai] step install {name}"
python3 -m venv {path}
install_env {path} "--find-links {mnt}/wheels/{name}" {specs}
ln -sf {path}/bin/{name} /usr/local/bin/{name}-server 2>/dev/null || true
"""

_KERNEL_SCRIPT = r"""set -eu
{functions}
echo "[bai] step install kernel"
{create}install_env {kernel} "--find-links {mnt}/wheels/kernel {constraints}" {specs}
echo "[bai] step compile"
compile_env {kernel}
echo "[bai] step kernelspec"
{kernel}/bin/python -m ipykernel install --prefix {kernel} --name {kernel_name} --display-name {display}
echo "[bai] done"
"""
# --system-site-packages keeps the user site on: `pip install --user X` goes
# to ~/.local (the home volume) and is importable in the kernel.
_CREATE_KERNEL = "python3 -m venv --system-site-packages {kernel}\n"

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

# Salt for recipe hashes: changes to the build procedure rebuild everything.
BUILDER_SALT = hashlib.sha256(
    (_FUNCTIONS + _ROOT_SCRIPT + _EXTRA_VENV + _KERNEL_SCRIPT + _CREATE_KERNEL + PIPFLAGS
     + Y.PROFILE + json.dumps(Y.IMAGE_ENV, sort_keys=True) + "v2").encode()
).hexdigest()[:12]


class BuildError(RuntimeError):
    """A build failed; the message names the recipe, the step and the reason,
    and says what to do."""

    def __init__(self, reason: str, recipe: R.Recipe | None = None, step: str = ""):
        self.reason, self.step = reason, step
        self.recipe = recipe.name if recipe else ""
        where = []
        if recipe is not None:
            where.append(f"recipe {recipe.name!r} ({recipe.path or 'no file'})")
        if step:
            where.append(f"step {step!r}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)


def docker_client():
    """A docker client that answered ping, or a BuildError saying how to fix it."""
    import docker
    url = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=ENGINE_TIMEOUT)
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


def plan(recipes_dir=None, extensions_dir=None) -> tuple[Path, Path | None, dict[str, R.Recipe], dict[str, str]]:
    """Resolve the sources (``sources.py``), load the recipes and hash them:
    ``(recipes_dir, extensions_dir or None, recipes, hashes)``. What ``build``
    and ``recipes`` both use, so they agree on every hash."""
    try:
        rdir = sources.recipes_dir(recipes_dir)
        recipes = load_resolved(rdir)
        edir, digest = None, "absent"
        if any(r.extensions for r in recipes.values()):
            edir = sources.extensions_dir(extensions_dir)
            if not R.is_installable(edir):
                raise BuildError(f"{edir} is not a Python project (no pyproject.toml): the base recipe installs "
                                 f"the session apps from it; pass --extensions DIR or set "
                                 f"{sources.EXTENSIONS_ENV}")
            digest = R.tree_digest(edir)
    except sources.SourceError as e:
        raise BuildError(str(e)) from None
    return rdir, edir, recipes, R.recipe_hashes(recipes, salt=BUILDER_SALT, extensions_digest=digest)


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


def unpacked_size(dirs: Iterable[Path]) -> int:
    """Bytes the wheels in ``dirs`` unpack to (each file name counted once)."""
    seen: dict[str, Path] = {}
    for d in dirs:
        for w in sorted(Path(d).glob("*.whl")):
            seen.setdefault(w.name, w)
    total = 0
    for w in seen.values():
        with zipfile.ZipFile(w) as z:
            total += sum(i.file_size for i in z.infolist())
    return total


def _pip_has_raw_progress() -> bool:
    try:
        major, minor = (int(x) for x in importlib.metadata.version("pip").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (24, 1)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "_.-" else "-" for c in s).strip("-.")


def _tail(lines: Iterable[str], n: int) -> str:
    # pip warns about every project missing from a local extra index; those
    # lines would hide the error itself
    useful = [ln for ln in lines if not ln.startswith("WARNING: Location ")]
    return "\n".join(useful[-n:])


def _quoted(specs: Iterable[str]) -> str:
    return " ".join(shlex.quote(s) for s in specs)


def _print(p: Progress) -> None:
    print(p, flush=True)


class Builder:
    """``registry``: a ``BaiRegistry`` to push each image to, or None to build on this engine only."""

    def __init__(self, client=None, recipes_dir=None, cache_dir=None, prefix=None, extensions_dir=None,
                 mirror=None, verbose=False, on_progress: Callable[[Progress], None] = _print,
                 progress_interval: float = 3.0, registry=None):
        self.cache_dir = Path(cache_dir or os.environ.get("BAI_CACHE_DIR") or DEFAULT_CACHE)
        self.prefix = prefix if prefix is not None else os.environ.get("BAI_IMAGE_PREFIX", DEFAULT_PREFIX)
        self.mirror = mirror or os.environ.get("BAI_DEBIAN_MIRROR") or DEFAULT_MIRROR
        self.verbose = verbose
        self.on_progress = on_progress
        self.progress_interval = progress_interval
        self.recipes_dir, self.extensions_dir, self.recipes, self.hashes = plan(recipes_dir, extensions_dir)
        self._client = client
        self.registry = registry
        self._registry_client = None
        self._where = (0, 0, "")        # (index, total, ref) of the image being built
        self._last = ("", 0.0)          # (step, time) of the last event shown

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

    # ------------------------------------------------------------------ progress
    def report(self, step: str, detail: str = "", done: int | None = None, size: int | None = None,
               unit: str = "", force: bool = True) -> None:
        """Tell ``on_progress``; a ``force=False`` update of the same step is
        shown at most every ``progress_interval`` seconds."""
        now = time.monotonic()
        if not force and self._last[0] == step and now - self._last[1] < self.progress_interval:
            return
        self._last = (step, now)
        index, total, ref = self._where
        self.on_progress(Progress(index, total, ref, step, detail, done, size, unit))

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
        for index, n in enumerate(order, 1):
            t0 = time.monotonic()
            r = self.recipes[n]
            ref = self.ref(n)
            self._where = (index, len(order), ref)
            built = self.find_built(n)
            if built is not None:
                iid = built.get("Id")
                how = ""
                if n in names and ref not in (built.get("RepoTags") or []):
                    self.api.tag(iid, *ref.rsplit(":", 1))
                    how = ", tagged"
                self.report("up to date", f"image {iid[7:19]}{how}")
                ids[n] = iid
                self.publish(r, iid)
                continue
            parent = self.rootfs_image(r) if r.is_root else ids[r.base]
            self.report("start", f"recipe {n} (hash {self.hashes[n]}) on "
                                 f"{'a debootstrap rootfs' if r.is_root else self.ref(r.base)}")
            try:
                ids[n] = self.build_one(r, parent)
            except BuildError:
                raise
            except Exception as e:  # the engine or the host failed us: say where
                raise BuildError(f"{type(e).__name__}: {e}; nothing was tagged, run the build again "
                                 f"(a busy Docker engine can time out)", r, self._last[0]) from e
            self.publish(r, ids[n])
            size = self.api.inspect_image(ids[n]).get("Size") or 0
            self.report("done", f"built in {time.monotonic() - t0:.0f} s, {size / 1e9:.2f} GB")
        return ids

    # ------------------------------------------------------------------ registry
    def publish(self, r: R.Recipe, image_id: str) -> None:
        """Push the tested image to the registry, unless it holds that very image under its name."""
        if self.registry is None:
            return
        name = self.ref(r.name)
        reference = self.registry.reference(name)
        repo, tag = split_name(name)
        try:
            there = self.registry_client.image(repo, tag)
        except RegistryError as e:
            raise BuildError(f"{e.message} The image is built and tagged {name} on this engine; build again to "
                             "push it, or pass --no-push.", r, "push") from None
        if there is not None and there.config == image_id:
            self.report("registry", f"{reference} is up to date in the registry (nothing pushed)")
            return
        self.api.tag(image_id, *split_name(reference))
        meter = Transfer()
        self.report("push", f"{reference}")
        try:
            for event in self.api.push(*split_name(reference), stream=True, decode=True,
                                       auth_config=self.registry.auth_config()):
                if meter.feed(event):
                    self.report("push", f"{reference}: {meter.describe_push()}", meter.done_bytes,
                                meter.total_bytes, "bytes", force=False)
            there = self.registry_client.image(repo, tag)
        except Exception as e:  # the stream's error, the registry's answer, the engine going away
            why = e.message if isinstance(e, RegistryError) else str(e) if isinstance(e, TransferFailed) else \
                f"{type(e).__name__}: {e}"
            raise BuildError(f"pushing {reference} failed: {why}. The image is built and tagged {name} on this "
                             "engine; build again to push it.", r, "push") from None
        if there is None or there.config != image_id:
            raise BuildError(f"after the push the registry does not hold {reference} as image {image_id[7:19]}; "
                             "build again to push it.", r, "push")
        self.report("push", f"{reference}: pushed {megabytes(there.size)} compressed ({there.digest[:19]})",
                    meter.done_bytes, meter.total_bytes, "bytes")

    @property
    def registry_client(self):
        if self._registry_client is None:
            self._registry_client = self.registry.client()
        return self._registry_client

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
        self.report("rootfs", f"importing {tar} as {repo}:{tag}")
        changes = [f"LABEL {json.dumps(L.NAME)}=\"rootfs\"", f"LABEL {json.dumps(L.RECIPE_HASH)}=\"{key}\"",
                   f"ENV PATH={Y.SYSTEM_PATH}", "ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]']
        try:
            self.api.import_image_from_file(str(tar), repository=repo, tag=tag, changes=changes)
            return self.api.inspect_image(f"{repo}:{tag}")["Id"]
        except Exception as e:
            raise BuildError(f"docker import of {tar} failed: {e}; delete the tarball to re-run debootstrap",
                             r, "rootfs") from None

    def debootstrap(self, r: R.Recipe, tar: Path) -> None:
        if shutil.which("debootstrap") is None:
            raise BuildError("debootstrap is not installed: apt-get install debootstrap", r, "rootfs")
        if os.geteuid() != 0:
            raise BuildError("debootstrap needs root: run `bai-images build` as root "
                             f"(once; the rootfs is cached in {self.cache_dir})", r, "rootfs")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=self.cache_dir))
        root = work / "root"
        try:
            cmd = ["debootstrap", f"--variant={ROOTFS_VARIANT}", f"--include={','.join(r.apt)}",
                   r.suite, str(root), self.mirror]
            self.report("rootfs", " ".join(cmd))
            t0 = time.monotonic()
            lines: deque[str] = deque(maxlen=15)
            with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
                try:
                    for line in p.stdout:
                        lines.append(line.rstrip())
                        if line.startswith("I: "):
                            self.report("rootfs", line[3:].strip(), force=False)
                    rc = p.wait()
                except BaseException:
                    p.kill()
                    raise
            if rc != 0:
                raise BuildError(f"debootstrap failed (exit {rc}); check the package names in field 'apt' "
                                 f"and the mirror {self.mirror} (BAI_DEBIAN_MIRROR):\n" + "\n".join(lines),
                                 r, "rootfs")
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for f in (root / junk).glob("*"):
                    if f.is_file():
                        f.unlink()
            partial = tar.with_suffix(".tar.partial")
            p = subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if p.returncode != 0:
                partial.unlink(missing_ok=True)
                raise BuildError(f"packing the rootfs failed: {p.stdout[-2000:]}", r, "rootfs")
            partial.rename(tar)
            self.report("rootfs", f"cached at {tar} ({time.monotonic() - t0:.0f} s)")
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

    def probe(self, r: R.Recipe, image: str, python: str) -> dict:
        rc, out = self.run_in(image, [python, "-c", _PROBE])
        if rc != 0:
            raise BuildError(f"cannot run {python} in the parent image {image[:19]} (exit {rc}): "
                             f"{out[-1500:]}", r, "check")
        return json.loads(out.strip().splitlines()[-1])

    @staticmethod
    def pip_download_cmd(info: dict, dest: Path) -> list[str]:
        """``pip download`` of wheels for the image's Python, glibc and arch
        (the host's pip configuration applies: index, mirror, CA bundle)."""
        py = ".".join(info["python"].split(".")[:2])
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", py, "--implementation", "cp",
               "--abi", f"cp{py.replace('.', '')}", "-d", str(dest)]
        if _pip_has_raw_progress():
            cmd += ["--progress-bar", "raw"]
        for p in manylinux_platforms(info["libc_version"], info["machine"]):
            cmd += ["--platform", p]
        return cmd

    def pip_download(self, r: R.Recipe, env: str, cmd: list[str], specs: list[str], info: dict) -> None:
        """Run one ``pip download``, reporting packages and bytes as they come."""
        meter = DownloadMeter()
        lines: deque[str] = deque(maxlen=200)
        t0 = time.monotonic()
        self.report("download", f"{env} environment: {' '.join(specs)}")
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
            try:
                for line in p.stdout:
                    lines.append(line.rstrip())
                    if meter.feed(line):
                        self.report("download", f"{env} environment: {meter.describe()}",
                                    meter.fetched, None, "bytes", force=False)
                rc = p.wait()
            except BaseException:
                p.kill()
                raise
        meter.close()
        if rc != 0:
            py = ".".join(info["python"].split(".")[:2])
            raise BuildError(
                f"pip download failed for {' '.join(specs)} (Python {py}, "
                f"{manylinux_platforms(info['libc_version'], info['machine'])[0]}): check that these versions "
                f"exist as wheels for this Python in the field 'packages' and that the host's pip index is "
                f"reachable; pip said:\n{_tail(lines, 12)}", r, "download")
        self.report("download", f"{env} environment: {meter.packages} packages, "
                                f"{megabytes(meter.fetched)} fetched in {time.monotonic() - t0:.0f} s",
                    meter.fetched, meter.fetched, "bytes")

    def extension_deps(self, r: R.Recipe, ext: list[str], info: dict, wheelhouse: Path, dest: Path,
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
            raise BuildError(f"the dependencies of {self.extensions_dir} cannot be downloaded as wheels; fix "
                             f"its pyproject.toml:\n{_tail(p.stdout.splitlines(), 12)}", r, "download")

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
            self.report("download", f"cached wheelhouse {final}")
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
                self.pip_download(r, env, cmd + specs, specs, info)
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
        if not r.extensions:
            return []
        out = scratch / "ext"
        out.mkdir()
        # Copy first so the build leaves no build/ or egg-info in the source folder.
        src = scratch / "ext-src"
        shutil.copytree(self.extensions_dir, src, ignore=shutil.ignore_patterns(
            "build", "dist", "*.egg-info", "__pycache__", ".*"))
        cmd = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", "--no-deps",
               "-w", str(out), str(src)]
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = sorted(str(w) for w in out.glob("*.whl"))
        if p.returncode != 0 or not wheels:
            raise BuildError(f"building a wheel of {self.extensions_dir} failed; fix the package "
                             f"there:\n{p.stdout[-2000:]}", r, "download")
        self.report("download", f"session apps: {Path(wheels[0]).name}")
        return wheels

    # ------------------------------------------------------------------ one recipe
    def build_one(self, r: R.Recipe, parent: str) -> str:
        api = self.api
        extends = not r.is_root and self.recipes[r.base].kind == R.KIND_KERNEL
        self.report("check", "Python, glibc and architecture of the parent image")
        info = self.probe(r, parent, f"{Y.KERNEL_ENV}/bin/python" if extends else "python3")
        msg = R.python_mismatch(r, info["python"])
        if msg:
            raise BuildError(msg, r, "check")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / "tmp").mkdir(exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{r.name}-", dir=self.cache_dir / "tmp"))
        os.chmod(scratch, 0o755)
        (scratch / "ext-wheels").mkdir()
        cid = image_id = None
        tagged = False
        try:
            if r.is_root:
                script, wheels, sizes, user = self.server_plan(r, info, scratch)
            else:
                script, wheels, sizes, user = self.kernel_plan(r, info, extends)
            (scratch / "build.sh").write_text(script)
            host_config = api.create_host_config(
                network_mode="none",
                binds={str(wheels): {"bind": f"{BUILD_MNT}/wheels", "mode": "ro"},
                       str(scratch): {"bind": f"{BUILD_MNT}/script", "mode": "ro"}})
            name = f"{_safe(self.prefix)}-build-{r.name}-{uuid.uuid4().hex[:6]}"
            cid = api.create_container(parent, command=["/bin/sh", f"{BUILD_MNT}/script/build.sh"],
                                       user=user, name=name, host_config=host_config)["Id"]
            api.start(cid)
            step, lines = self.follow_build(cid, sizes)
            rc = api.wait(cid)["StatusCode"]
            if rc != 0:
                raise BuildError(f"the build container failed (exit {rc}); pip said:\n{_tail(lines, 25)}",
                                 r, step)
            self.report("commit", "writing the image")
            python = ".".join(info["python"].split(".")[:2])
            image_id = api.commit(cid, changes=self.commit_changes(r, python))["Id"]
            api.remove_container(cid, force=True)
            cid = None
            if r.test:
                self.report("test", r.test.strip().splitlines()[0][:120])
                rc, out = self.run_in(image_id, ["/bin/sh", "-c", r.test])
                if rc != 0:
                    raise BuildError(f"the recipe's test failed (exit {rc}) in the new image; fix the field "
                                     f"'test' or 'packages'. It said:\n{out[-2000:]}", r, "test")
                last = out.strip().splitlines()[-1:] or [""]
                self.report("test", f"ok {last[0][:160]}".rstrip())
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

    def server_plan(self, r: R.Recipe, info: dict, scratch: Path) -> tuple[str, Path, dict[str, int], str]:
        """A recipe on "rootfs": the server environment, its ``venvs``, the
        empty kernel environment and the login-shell PATH, as root.
        Returns ``(script, wheelhouse, {env: unpacked bytes}, user)``."""
        envs = {"server": list(r.packages), **{n: list(specs) for n, specs in r.venvs}}
        ext = self.extension_wheels(r, scratch)
        wheels = self.wheelhouse(r, envs, info, [])
        if ext:
            self.extension_deps(r, ext, info, wheels / "server", scratch / "ext-wheels", list(r.packages))
        ext_specs = [f"{BUILD_MNT}/script/ext-wheels/{Path(w).name}" for w in ext]
        extra = "".join(_EXTRA_VENV.format(path=f"{Y.ENVS_DIR}/{n}", name=n, mnt=BUILD_MNT, specs=_quoted(specs))
                        for n, specs in r.venvs)
        compile_ = "\n".join(f"compile_env {p}" for p in [Y.SERVER_ENV] + [f"{Y.ENVS_DIR}/{n}" for n, _ in r.venvs])
        script = _ROOT_SCRIPT.format(
            functions=_FUNCTIONS.format(pipflags=PIPFLAGS), user=Y.NB_USER, uid=Y.NB_UID, gid=Y.NB_GID,
            home=Y.NB_HOME, shell=Y.SHELL, envs_dir=Y.ENVS_DIR, server=Y.SERVER_ENV, kernel=Y.KERNEL_ENV,
            mnt=BUILD_MNT, server_specs=_quoted(list(r.packages) + ext_specs), extra_venvs=extra,
            compile=compile_, profile_script=Y.PROFILE_SCRIPT, profile=Y.PROFILE)
        sizes = {"server": unpacked_size([wheels / "server", scratch / "ext-wheels"]),
                 **{n: unpacked_size([wheels / n]) for n, _ in r.venvs}}
        return script, wheels, sizes, "0:0"

    def kernel_plan(self, r: R.Recipe, info: dict, extends: bool) -> tuple[str, Path, dict[str, int], str]:
        """A kernel recipe: make the kernel environment (or, on another kernel
        recipe, add to it without changing what is there) and register it as
        the default kernel, as the user. Same return as ``server_plan``."""
        constraints = []
        if extends:
            pins = {R.dist_name(p) for p in r.packages}
            constraints = [c for c in info["freeze"] if R.dist_name(c) not in pins]
        specs = R.kernel_requirements(self.recipes, r.name)
        wheels = self.wheelhouse(r, {"kernel": specs}, info, constraints)
        script = _KERNEL_SCRIPT.format(
            functions=_FUNCTIONS.format(pipflags=PIPFLAGS), kernel=Y.KERNEL_ENV, mnt=BUILD_MNT,
            specs=_quoted(specs), create="" if extends else _CREATE_KERNEL.format(kernel=Y.KERNEL_ENV),
            constraints=f"-c {BUILD_MNT}/wheels/constraints.txt" if constraints else "",
            kernel_name=Y.KERNEL_NAME, display=shlex.quote(f"Python 3 ({r.display_name})"))
        return script, wheels, {"kernel": unpacked_size([wheels / "kernel"])}, f"{Y.NB_UID}:{Y.NB_GID}"

    def follow_build(self, cid: str, sizes: dict[str, int]) -> tuple[str, list[str]]:
        """Stream the build container's output as progress; returns the last
        step it reached and its output."""
        step, lines, buf = "install", [], b""

        def take(raw: bytes) -> None:
            nonlocal step
            line = raw.decode(errors="replace").rstrip("\r")
            lines.append(line)
            event = script_event(line)
            if event is None:
                if self.verbose:
                    self.report(step.split()[0], f"| {line[:300]}")
            elif event[0] == "step":
                step = event[1]
                what = step.split()
                if what[0] == "install":
                    self.report("install", install_detail(what[1], 0, sizes.get(what[1], 0)), 0,
                                sizes.get(what[1]), "bytes")
                else:
                    self.report(what[0])
            else:
                _, env, done = event
                self.report("install", install_detail(env, done, sizes.get(env, 0)), done,
                            sizes.get(env), "bytes", force=False)

        for chunk in self.api.logs(cid, stream=True, follow=True):
            buf += chunk
            *done, buf = buf.split(b"\n")
            for raw in done:
                take(raw)
        if buf:
            take(buf)
        return step, lines

    def commit_changes(self, r: R.Recipe, python: str) -> list[str]:
        labels = {
            L.KIND: r.kind, L.NAME: r.name, L.FRAMEWORK: r.framework, L.VERSION: r.version,
            L.DISPLAY_NAME: r.display_name, L.PYTHON: python, L.RECIPE_HASH: self.hashes[r.name],
        }
        changes = [f"LABEL {json.dumps(k)}={json.dumps(v)}" for k, v in labels.items()]
        changes += [f"ENV {k}={v}" for k, v in Y.IMAGE_ENV.items()]
        changes += [f"USER {Y.NB_USER}", f"WORKDIR {Y.NB_HOME}",
                    'ENTRYPOINT ["tini", "-g", "--"]', 'CMD ["jupyterhub-singleuser"]']
        return changes
