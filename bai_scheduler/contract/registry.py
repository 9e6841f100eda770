"""The image registry: where kernel and private images live, and where every node pulls from.

One registry serves the cluster: by default Debian's ``docker-registry`` (the CNCF distribution
registry) on 127.0.0.1, started by ``scripts/setup.sh`` with its data in the hub's data folder; in
production any registry that speaks the Docker Registry HTTP API V2 including its catalog
(``/v2/_catalog``): a distribution registry behind TLS with htpasswd logins, or Harbor
(docs/install.md, "Image registry").

Names. An image's *reference* is what a node pulls and a container runs:
``<host>/<repository>:<tag>``, e.g. ``127.0.0.1:5000/bai/sklearn:1.6.1``. Its *name* is the
reference without the registry's host, ``bai/sklearn:1.6.1``: what users see and type.
``BaiRegistry.reference`` and ``BaiRegistry.name_of`` convert.

``RegistryClient`` is the HTTP API (blocking, over ``requests``; call it from worker threads
only): the catalog, tags, manifests, config blobs (an image's labels), deleting a manifest, and
the two ways registries ask for a login (Basic for htpasswd, Bearer tokens for Harbor and
cloud registries). ``BaiRegistry`` is the configuration, ``c.BaiRegistry``, read alike by the
hub's spawner (pulls), the scheduler service (catalog, snapshots) and ``bai-images`` (pushes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
import threading
from pathlib import Path
from urllib.parse import quote, urljoin, urlparse

import requests
from traitlets import Float, Unicode, validate
from traitlets.config import Configurable

DEFAULT_URL = "http://127.0.0.1:5000"

# What a manifest may be: one image (Docker's schema 2, OCI), or a list of per-platform images.
IMAGE_MANIFESTS = ("application/vnd.docker.distribution.manifest.v2+json",
                   "application/vnd.oci.image.manifest.v1+json")
MANIFEST_LISTS = ("application/vnd.docker.distribution.manifest.list.v2+json",
                  "application/vnd.oci.image.index.v1+json")
ACCEPT = ", ".join(IMAGE_MANIFESTS + MANIFEST_LISTS)
# Docker's names for this machine's architecture in manifest lists.
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


class RegistryError(Exception):
    """The registry refused or did not answer. ``message`` is safe to show and says what to do;
    ``status`` is the HTTP status to answer with (404: no such image or tag)."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclasses.dataclass(frozen=True)
class RegistryImage:
    """One tag in the registry and the image it names."""

    repository: str            # "bai/sklearn"
    tag: str                   # "1.6.1"
    digest: str                # the tag's manifest digest (what deleting it removes)
    config: str                # the image config's digest = the image id on every engine that pulls it
    layers: tuple[tuple[str, int], ...]   # (digest, compressed bytes), what a pull downloads
    labels: dict = dataclasses.field(hash=False, compare=False, default_factory=dict)
    created: str = ""

    @property
    def size(self) -> int:
        return sum(size for _, size in self.layers)


def split_name(name: str) -> tuple[str, str]:
    """``"bai/sklearn:1.6.1"`` → ``("bai/sklearn", "1.6.1")``; no tag means ``latest``
    (a ``:`` before the last ``/`` is a port, not a tag)."""
    repo, sep, tag = name.rpartition(":")
    if not sep or "/" in tag:
        return name, "latest"
    return repo, tag


class RegistryClient:
    """The registry's HTTP API (blocking). Logs in when the registry asks: Basic with the
    credentials given, or a Bearer token fetched from the registry's token service."""

    page = 1000  # repositories asked for per page of the catalog

    def __init__(self, url: str, credentials: tuple[str, str] | None = None, ca_file: str = "",
                 timeout: float = 30):
        self.url = url.rstrip("/")
        self.credentials = credentials
        self.timeout = timeout
        self.session = requests.Session()
        if ca_file:
            self.session.verify = ca_file
        self._tokens: dict[str, str] = {}   # scope -> Bearer token
        self._images: dict[str, tuple] = {}  # manifest digest -> (config, layers, labels, created)
        self._lock = threading.Lock()

    # -- requests, errors, logins ------------------------------------------------------------------

    def _request(self, method: str, path: str, scope: str, **kw) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        token = self._tokens.get(scope)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        for attempt in range(2):
            try:
                r = self.session.request(method, self.url + path, headers=headers, timeout=self.timeout,
                                         auth=None if token or not self.credentials else self.credentials, **kw)
            except requests.exceptions.SSLError as e:
                raise RegistryError(f"The image registry at {self.url} has a TLS certificate this machine does "
                                    f"not trust ({e.__class__.__name__}); set c.BaiRegistry.ca_file to its CA "
                                    "bundle.", 502) from None
            except (requests.ConnectionError, requests.Timeout) as e:
                raise RegistryError(f"The image registry at {self.url} does not answer ({e.__class__.__name__}); "
                                    "start it (scripts/setup.sh starts the local one) or check c.BaiRegistry.url.",
                                    503) from None
            if r.status_code != 401 or attempt:
                break
            challenge = r.headers.get("WWW-Authenticate", "")
            if not challenge.lower().startswith("bearer"):
                break  # Basic: the credentials (if any) went with the first request already
            token = self._fetch_token(challenge, scope)
            headers["Authorization"] = f"Bearer {token}"
        if r.status_code == 401:
            raise RegistryError(f"The image registry at {self.url} refused the login"
                                + (" (no credentials: set c.BaiRegistry.username and password_file, or run "
                                   "`docker login` for it on this machine)." if not self.credentials else
                                   ": check c.BaiRegistry.username and password_file."), 502)
        if r.status_code == 403:
            raise RegistryError(f"The image registry at {self.url} does not allow this account to {method} "
                                f"{path.split('?')[0]}; give it that permission.", 502)
        if r.status_code >= 500:
            raise RegistryError(f"The image registry at {self.url} failed (HTTP {r.status_code}: "
                                f"{r.text.strip()[:200]}); look at its log.", 502)
        return r

    def _fetch_token(self, challenge: str, scope: str) -> str:
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        realm = params.pop("realm", "")
        if not realm:
            raise RegistryError(f"The image registry at {self.url} asked for a token without saying where "
                                "to get one.", 502)
        params["scope"] = scope
        try:
            r = requests.get(realm, params=params, auth=self.credentials, timeout=self.timeout,
                             verify=self.session.verify)
        except requests.RequestException as e:
            raise RegistryError(f"The token service of the image registry ({realm}) does not answer "
                                f"({e.__class__.__name__}).", 503) from None
        if r.status_code != 200:
            raise RegistryError(f"The image registry's token service refused the login (HTTP {r.status_code}): "
                                "check c.BaiRegistry.username and password_file.", 502)
        body = r.json()
        token = body.get("token") or body.get("access_token") or ""
        self._tokens[scope] = token
        return token

    @staticmethod
    def _repo_path(repository: str) -> str:
        return quote(repository, safe="/")

    # -- reading -----------------------------------------------------------------------------------

    def ping(self) -> None:
        """Raise ``RegistryError`` unless the registry answers its API."""
        r = self._request("GET", "/v2/", "registry:catalog:*")
        if r.status_code != 200:
            raise RegistryError(f"{self.url} is not an image registry (GET /v2/ answered HTTP {r.status_code}).")

    def repositories(self) -> list[str]:
        """Every repository, following the catalog's pages."""
        out: list[str] = []
        path = f"/v2/_catalog?n={self.page}"
        while path:
            r = self._request("GET", path, "registry:catalog:*")
            if r.status_code != 200:
                raise RegistryError(f"The image registry at {self.url} does not list its repositories (HTTP "
                                    f"{r.status_code}); BAI Hub needs its catalog API (/v2/_catalog).")
            out += r.json().get("repositories") or []
            nxt = urljoin(self.url + path, r.links["next"]["url"]) if "next" in r.links else ""
            path = nxt[len(self.url):] if nxt.startswith(self.url + "/") else ""
        return out

    def tags(self, repository: str) -> list[str]:
        """The repository's tags ([] when it has none, or no longer exists)."""
        r = self._request("GET", f"/v2/{self._repo_path(repository)}/tags/list", f"repository:{repository}:pull")
        if r.status_code == 404:
            return []
        if r.status_code != 200:
            raise RegistryError(f"The image registry could not list the tags of {repository} (HTTP {r.status_code}).")
        return sorted(r.json().get("tags") or [])

    def _manifest(self, repository: str, reference: str) -> tuple[str, dict] | None:
        r = self._request("GET", f"/v2/{self._repo_path(repository)}/manifests/{reference}",
                          f"repository:{repository}:pull", headers={"Accept": ACCEPT})
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise RegistryError(f"The image registry could not read {repository}:{reference} (HTTP {r.status_code}).")
        digest = r.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(r.content).hexdigest()
        return digest, r.json()

    def digest(self, repository: str, tag: str) -> str | None:
        """The manifest digest ``tag`` names now, or None when there is no such tag."""
        r = self._request("HEAD", f"/v2/{self._repo_path(repository)}/manifests/{tag}",
                          f"repository:{repository}:pull", headers={"Accept": ACCEPT})
        if r.status_code == 404:
            return None
        if r.status_code != 200 or not r.headers.get("Docker-Content-Digest"):
            found = self._manifest(repository, tag)
            return found[0] if found else None
        return r.headers["Docker-Content-Digest"]

    def image(self, repository: str, tag: str) -> RegistryImage | None:
        """The image ``repository:tag`` names (its layers, its config's labels), or None.
        What a digest names never changes, so each is read once."""
        digest = self.digest(repository, tag)
        if digest is None:
            return None
        with self._lock:
            known = self._images.get(digest)
        if known is None:
            known = self._read_image(repository, digest)
            if known is None:
                return None
            with self._lock:
                self._images[digest] = known
        config, layers, labels, created = known
        return RegistryImage(repository, tag, digest, config, layers, labels, created)

    def _read_image(self, repository: str, digest: str) -> tuple | None:
        found = self._manifest(repository, digest)
        if found is None:
            return None
        _, manifest = found
        if manifest.get("mediaType") in MANIFEST_LISTS or "manifests" in manifest:
            arch = ARCHITECTURES.get(platform.machine(), platform.machine())
            match = [m for m in manifest.get("manifests") or []
                     if (m.get("platform") or {}).get("os") == "linux"
                     and (m.get("platform") or {}).get("architecture") == arch]
            if not match:
                return None  # nothing for this platform: not an image these nodes can run
            found = self._manifest(repository, match[0]["digest"])
            if found is None:
                return None
            _, manifest = found
        config = (manifest.get("config") or {}).get("digest")
        if not config:
            return None  # schema 1 or something else: not an image BAI Hub made
        r = self._request("GET", f"/v2/{self._repo_path(repository)}/blobs/{config}", f"repository:{repository}:pull")
        if r.status_code == 404:
            return None
        if r.status_code != 200:
            raise RegistryError(f"The image registry could not read the config of {repository}@{digest} "
                                f"(HTTP {r.status_code}).")
        blob = json.loads(r.content)
        labels = (blob.get("config") or {}).get("Labels") or {}
        layers = tuple((layer["digest"], int(layer.get("size") or 0)) for layer in manifest.get("layers") or [])
        return config, layers, dict(labels), str(blob.get("created") or "")

    def images(self) -> list[RegistryImage]:
        """Every tag of every repository and the image it names (tags that vanish meanwhile are skipped)."""
        out = []
        for repository in self.repositories():
            for tag in self.tags(repository):
                found = self.image(repository, tag)
                if found is not None:
                    out.append(found)
        return out

    # -- changing ----------------------------------------------------------------------------------

    def delete(self, repository: str, digest: str) -> bool:
        """Delete the manifest ``digest`` (and so every tag naming it); False when it is gone already.
        Its layers stay on disk until the registry's garbage collection (docs/install.md)."""
        r = self._request("DELETE", f"/v2/{self._repo_path(repository)}/manifests/{digest}",
                          f"repository:{repository}:delete,pull")
        if r.status_code == 404:
            return False
        if r.status_code == 405:
            raise RegistryError(f"The image registry at {self.url} does not allow deleting images: enable it "
                                "(storage: delete: enabled: true in its config.yml).", 502)
        if r.status_code not in (200, 202):
            raise RegistryError(f"The image registry refused to delete {repository}@{digest} (HTTP {r.status_code}).")
        return True


class BaiRegistry(Configurable):
    """The registry every node pulls kernel and private images from (``c.BaiRegistry``)."""

    url = Unicode(
        DEFAULT_URL, config=True,
        help="""The image registry's address, with its scheme: http://127.0.0.1:5000 (the local one
        scripts/setup.sh starts, BAI_REGISTRY_URL) or e.g. https://registry.example.com for a
        registry with TLS. Images are named <host>/<name>, e.g. 127.0.0.1:5000/bai/sklearn:1.6.1. A
        plain-HTTP registry anywhere but on 127.0.0.0/8 must be in every node's Docker
        'insecure-registries'; a TLS one with a private CA needs the CA in each node's
        /etc/docker/certs.d/<host>/ca.crt (docs/install.md).""",
    )
    username = Unicode(
        "", config=True,
        help="Account for a registry that wants a login (htpasswd, Harbor robot account). Empty: the "
        "credentials `docker login <host>` stored on this machine (docker's config.json), if any. "
        "The hub sends them with every pull, so nodes need no login of their own.",
    )
    password_file = Unicode(
        "", config=True,
        help="File holding the password of c.BaiRegistry.username (mode 600; kept out of the config file).",
    )
    ca_file = Unicode(
        "", config=True,
        help="CA bundle that signed the registry's TLS certificate, for the catalog requests of the hub "
        "and the service (the nodes' engines read /etc/docker/certs.d). Empty: the system's CAs.",
    )
    catalog_ttl = Float(
        15, config=True,
        help="Seconds the catalog read from the registry is reused before it is read again. A snapshot "
        "or a deletion made through BAI Hub shows at once; an image pushed from elsewhere within this time.",
    )
    timeout = Float(30, config=True, help="Seconds one request to the registry may take.")

    @validate("url")
    def _check_url(self, proposal):
        url = proposal.value.strip().rstrip("/")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path or "@" in parsed.netloc:
            raise ValueError(f"c.BaiRegistry.url must look like http://127.0.0.1:5000 or "
                             f"https://registry.example.com, not {proposal.value!r}")
        return url

    @property
    def host(self) -> str:
        """The registry's part of image references: ``127.0.0.1:5000``."""
        return urlparse(self.url).netloc

    def reference(self, name: str) -> str:
        """What a node pulls for the name users type: ``bai/x:1`` → ``127.0.0.1:5000/bai/x:1``."""
        return name if self.is_ours(name) else f"{self.host}/{name}"

    def is_ours(self, ref: str) -> bool:
        return ref.startswith(self.host + "/")

    def name_of(self, ref: str) -> str:
        """What users see for a reference: ``127.0.0.1:5000/bai/x:1`` → ``bai/x:1``."""
        return ref[len(self.host) + 1:] if self.is_ours(ref) else ref

    def credentials(self) -> tuple[str, str] | None:
        """(user, password) for the registry: the configured account, else ``docker login``'s."""
        if self.username:
            try:
                return self.username, Path(self.password_file).read_text().strip() if self.password_file else ""
            except OSError as e:
                raise RegistryError(f"Cannot read c.BaiRegistry.password_file ({e.strerror}).", 500) from None
        import docker.auth  # docker-py's reading of config.json and credential helpers

        try:
            found = docker.auth.resolve_authconfig(docker.auth.load_config(), self.host) or {}
        except Exception:  # a broken config.json or credential helper: as if there were no login
            found = {}
        user = found.get("username") or found.get("Username")
        password = found.get("password") or found.get("Password")
        return (user, password) if user and password else None

    def auth_config(self) -> dict | None:
        """What docker-py's pull and push send to a node's engine (X-Registry-Auth)."""
        creds = self.credentials()
        return {"username": creds[0], "password": creds[1], "serveraddress": self.host} if creds else None

    def client(self) -> RegistryClient:
        return RegistryClient(self.url, self.credentials(), self.ca_file, self.timeout)
