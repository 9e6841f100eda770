"""The registry's names and configuration, and the Bearer-token login of Harbor and cloud
registries (which cannot run here: a small stand-in speaks the token protocol of the Docker
Registry spec; Basic logins are tested against Debian's registry in tests/engine/test_registry.py)."""
from __future__ import annotations

import base64
import http.server
import json
import threading

import pytest

from bai_scheduler.contract.registry import BaiRegistry, RegistryClient, RegistryError, split_name


def test_names_users_see_and_references_nodes_pull():
    reg = BaiRegistry(url="http://127.0.0.1:5000/")
    assert reg.url == "http://127.0.0.1:5000" and reg.host == "127.0.0.1:5000"
    assert reg.reference("bai/sklearn:1.6.1") == "127.0.0.1:5000/bai/sklearn:1.6.1"
    assert reg.reference("127.0.0.1:5000/bai/sklearn:1.6.1") == "127.0.0.1:5000/bai/sklearn:1.6.1"
    assert reg.name_of("127.0.0.1:5000/bai-private/alice:v1") == "bai-private/alice:v1"
    assert reg.name_of("other.example.com/x:1") == "other.example.com/x:1"
    assert BaiRegistry(url="https://registry.example.com").host == "registry.example.com"
    assert split_name("127.0.0.1:5000/bai/x") == ("127.0.0.1:5000/bai/x", "latest")


@pytest.mark.parametrize("url", ["127.0.0.1:5000", "ftp://x", "http://", "http://a/b", "http://u:p@host"])
def test_a_registry_url_that_is_not_one_is_a_config_error(url):
    with pytest.raises(ValueError, match="must look like http://127.0.0.1:5000"):
        BaiRegistry(url=url)


def test_credentials_come_from_the_config_or_docker_login(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    reg = BaiRegistry(url="https://registry.example.com")
    assert reg.credentials() is None and reg.auth_config() is None
    auth = base64.b64encode(b"robot$bai:s3cret").decode()
    (tmp_path / "config.json").write_text(json.dumps({"auths": {"registry.example.com": {"auth": auth}}}))
    assert reg.credentials() == ("robot$bai", "s3cret")
    (tmp_path / "pw").write_text("other\n")
    reg = BaiRegistry(url="https://registry.example.com", username="admin", password_file=str(tmp_path / "pw"))
    assert reg.auth_config() == {"username": "admin", "password": "other", "serveraddress": "registry.example.com"}
    with pytest.raises(RegistryError, match="Cannot read c.BaiRegistry.password_file"):
        BaiRegistry(url="https://r.example.com", username="a", password_file=str(tmp_path / "none")).credentials()


class TokenRegistry(http.server.BaseHTTPRequestHandler):
    """A registry that wants Bearer tokens from its token service (as Harbor does)."""

    issued: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path.startswith("/token"):
            if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"robot:pw").decode():
                return self.reply(401, {})
            self.issued.append(self.path)
            return self.reply(200, {"token": "t0ken"})
        if self.headers.get("Authorization") != "Bearer t0ken":
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="{base}/token",service="reg",scope="x"')
            self.end_headers()
            return
        self.reply(200, {"repositories": ["bai/sklearn"]})

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def token_registry():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TokenRegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    TokenRegistry.issued = []
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_bearer_token_is_fetched_once_per_scope_with_the_credentials(token_registry):
    client = RegistryClient(token_registry, ("robot", "pw"))
    assert client.repositories() == ["bai/sklearn"]
    assert client.repositories() == ["bai/sklearn"]
    assert TokenRegistry.issued == ["/token?service=reg&scope=registry%3Acatalog%3A%2A"]
    with pytest.raises(RegistryError, match="token service refused the login"):
        RegistryClient(token_registry, ("robot", "wrong")).repositories()
