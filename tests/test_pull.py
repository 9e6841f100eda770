"""What a user reads when pulling a session's image fails: the engine's errors as Docker 20.10 gives
them (recorded from pulls from Debian's docker-registry), turned into why and what to do."""
import docker
import pytest
import requests
import urllib3

from bai_scheduler.contract.transfer import TransferFailed
from bai_spawner.pull import engine_message, failure_reason

HOST = "127.0.0.1:5000"


def api_error(cls, status, explanation):
    response = requests.Response()
    response.status_code = status
    return cls("500 Server Error for http+docker://localhost/v1.41/images/create", response=response,
               explanation=explanation)


@pytest.mark.parametrize("error, says", [
    (api_error(docker.errors.NotFound, 404, 'manifest for 127.0.0.1:5000/bai/x:gone not found: manifest unknown: '
                                            'manifest unknown'),
     "the registry has no such image any more (it was deleted or replaced); pick another image in the form"),
    (TransferFailed("manifest unknown"), "the registry has no such image any more"),
    (api_error(docker.errors.APIError, 500, 'Get "http://127.0.0.1:5000/v2/": dial tcp 127.0.0.1:5000: connect: '
                                           'connection refused'),
     f"the node cannot reach the image registry at {HOST} (Get \"http://127.0.0.1:5000/v2/\": dial tcp "
     "127.0.0.1:5000: connect: connection refused); ask an admin to start the registry or check "
     "c.BaiRegistry.url, then start the session again"),
    (TransferFailed("unauthorized: authentication required"),
     f"the registry at {HOST} refused the node's login (unauthorized: authentication required); ask an admin "
     "to check c.BaiRegistry.username and password_file"),
    (api_error(docker.errors.APIError, 500, 'Get "https://reg.example.com/v2/": x509: certificate signed by '
                                           'unknown authority'),
     "the node does not trust the registry at"),
    (requests.exceptions.ConnectionError("('Connection aborted.', ConnectionResetError(104))"),
     "the node's Docker engine stopped answering (ConnectionError); start the session again"),
    (requests.exceptions.ChunkedEncodingError("Connection broken"),
     "the node's Docker engine stopped answering (ChunkedEncodingError)"),
    (urllib3.exceptions.ProtocolError("Connection broken"), "the node's Docker engine stopped answering"),
    (TransferFailed("write /var/lib/docker/tmp/x: no space left on device"),
     "the node's engine said: write /var/lib/docker/tmp/x: no space left on device; start the session again"),
])
def test_a_failed_pull_says_why_and_what_to_do(error, says):
    assert says in failure_reason(error, HOST)


def test_the_engines_address_is_never_shown():
    e = requests.exceptions.ConnectionError("HTTPConnectionPool(host='10.0.0.7', port=2375): Max retries exceeded")
    assert "10.0.0.7" not in failure_reason(e, HOST) and engine_message(e) == "ConnectionError"
