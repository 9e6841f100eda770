"""The registry client and the catalog against Debian's docker-registry, with images the real
Docker engine pushed: labels from config blobs, several tags of one image, pages of the catalog,
deleting, htpasswd logins (the registry's and the engine's, through X-Registry-Auth), and a registry
that is down. Each test runs a registry of its own (tests/helpers/registry.py)."""
from __future__ import annotations

import functools
import http.server
import secrets
import threading

import docker as docker_sdk
import pytest

from bai_scheduler.contract import labels as L
from bai_scheduler.contract.catalog import catalog_from_registry, resolve_image
from bai_scheduler.contract.registry import BaiRegistry, RegistryClient, RegistryError
from helpers.hub import docker
from helpers.registry import LocalRegistry, push, tiny_image

pytestmark = pytest.mark.docker

KERNEL = {L.KIND: L.KIND_KERNEL, L.FRAMEWORK: "tiny", L.VERSION: "1.0", L.DISPLAY_NAME: "Tiny 1.0"}


@pytest.fixture
def registry(tmp_path):
    reg = LocalRegistry(tmp_path / "registry").start()
    made = []
    yield reg, made
    reg.stop()
    if made:
        docker("rmi", "-f", *made)


def test_the_catalog_is_what_the_registry_holds_with_labels_from_the_config_blobs(registry):
    reg, made = registry
    run = secrets.token_hex(3)
    refs = {name: f"{reg.host}/bai-test-{run}/{name}" for name in ("tiny:1.0", "tiny:stable", "other:2", "plain:1")}
    tiny_id = tiny_image(refs["tiny:1.0"], KERNEL)
    assert docker("tag", refs["tiny:1.0"], refs["tiny:stable"]).returncode == 0
    other_id = tiny_image(refs["other:2"], {**KERNEL, L.VERSION: "2"}, b"other\n")
    tiny_image(refs["plain:1"], {}, b"plain\n")
    made += list(refs.values())
    for ref in refs.values():
        push(ref)

    client = RegistryClient(reg.url)
    client.page = 1  # one repository a page: the catalog's Link header is followed
    assert sorted(client.repositories()) == sorted({f"bai-test-{run}/{n}" for n in ("tiny", "other", "plain")})
    found = client.images()
    assert len(found) == 4 and {i.config for i in found if i.repository.endswith("/tiny")} == {tiny_id}
    cat = catalog_from_registry(found, reg.host)
    assert [(c.short_ref, c.id) for c in cat] == [(f"bai-test-{run}/other:2", other_id),
                                                  (f"bai-test-{run}/tiny:1.0", tiny_id)]
    tiny = cat[1]
    assert tiny.names == (f"bai-test-{run}/tiny:1.0", f"bai-test-{run}/tiny:stable")
    assert tiny.display_name == "Tiny 1.0" and tiny.size > 0 and tiny.size == sum(n for _, n in tiny.layers)
    assert resolve_image(cat, "anyone", f"bai-test-{run}/tiny:stable") == tiny

    # Deleting the manifest removes both tags naming it; the other image stays.
    repo = f"bai-test-{run}/tiny"
    digest = client.digest(repo, "1.0")
    assert client.delete(repo, digest) is True
    assert client.digest(repo, "stable") is None and client.tags(repo) == []
    assert client.delete(repo, digest) is False
    assert [c.short_ref for c in catalog_from_registry(client.images(), reg.host)] == [f"bai-test-{run}/other:2"]


def test_a_registry_with_logins(tmp_path):
    password = secrets.token_urlsafe(12)
    reg = LocalRegistry(tmp_path / "registry", users={"bai": password}).start()
    ref = f"{reg.host}/bai-test-{secrets.token_hex(3)}/tiny:1.0"
    try:
        with pytest.raises(RegistryError, match="refused the login .no credentials: set c.BaiRegistry.username"):
            RegistryClient(reg.url).repositories()
        with pytest.raises(RegistryError, match="refused the login: check c.BaiRegistry.username"):
            RegistryClient(reg.url, ("bai", "wrong")).repositories()
        (tmp_path / "password").write_text(password + "\n")
        config = BaiRegistry(url=reg.url, username="bai", password_file=str(tmp_path / "password"))
        assert config.auth_config() == {"username": "bai", "password": password, "serveraddress": reg.host}
        # The engine pushes and pulls with the credentials the hub sends (X-Registry-Auth): no docker login.
        image_id = tiny_image(ref, KERNEL)
        api = docker_sdk.APIClient(version="auto")
        for auth in (None, {"username": "bai", "password": "wrong"}):
            refused = list(api.push(ref.rsplit(":", 1)[0], "1.0", stream=True, decode=True, auth_config=auth))
            assert any("error" in e for e in refused), refused
        events = list(api.push(ref.rsplit(":", 1)[0], "1.0", stream=True, decode=True,
                               auth_config=config.auth_config()))
        assert not [e for e in events if "error" in e], events
        assert [i.config for i in config.client().images()] == [image_id]
        docker("rmi", "-f", ref)
        list(api.pull(ref.rsplit(":", 1)[0], "1.0", stream=True, decode=True, auth_config=config.auth_config()))
        assert docker("image", "inspect", "--format", "{{.Id}}", ref).stdout.strip() == image_id
    finally:
        reg.stop()
        docker("rmi", "-f", ref)


def test_a_registry_that_is_down_says_so_and_what_to_do(tmp_path):
    reg = LocalRegistry(tmp_path / "registry").start()
    reg.stop()
    with pytest.raises(RegistryError) as e:
        RegistryClient(reg.url).images()
    assert e.value.status == 503
    assert e.value.message == (f"The image registry at {reg.url} does not answer (ConnectionError); start it "
                               "(scripts/setup.sh starts the local one) or check c.BaiRegistry.url.")


def test_a_web_server_that_is_no_registry_is_named_as_such(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RegistryError, match=r"is not an image registry \(GET /v2/ answered HTTP 404\)"):
            RegistryClient(f"http://127.0.0.1:{server.server_port}").ping()
    finally:
        server.shutdown()
