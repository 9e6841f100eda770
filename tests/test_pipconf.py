"""The sessions' package index (bai_spawner/pipconf.py): the host's pip configuration turned into
the sessions' pip.conf, CA bundle and read-only mounts; as plain functions, and from this host's
own ``pip config list``."""
import configparser
import os

import pytest

from bai_spawner import pipconf

# This machine's `pip config list` when the test was written: a CA bundle, find-links and local
# file:// indexes both from files and from PIP_* variables, a constraint file.
LISTED = """:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.disable-pip-version-check='1'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
global.cache-dir='/root/.cache/pip'
install.index-url='https://mirror.example/simple'
"""


def test_the_hosts_settings_become_the_sessions_pip_conf_and_ca():
    options = pipconf.parse_list(LISTED)
    assert options["global"]["find-links"] == "/opt/wheels" and options["global"]["default-timeout"] == "180"
    here = {"/etc/ssl/certs/ca-certificates.crt", "/etc/xdg/pip/constraints.txt", "/opt/pypi/simple", "/opt/wheels"}
    made = pipconf.session_config(options, exists=here.__contains__)
    assert made.ca_bundle == "/etc/ssl/certs/ca-certificates.crt"
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_string(made.text)
    assert dict(conf["global"]) == {
        "default-timeout": "180", "disable-pip-version-check": "1", "find-links": "/opt/wheels",
        "constraint": "/etc/xdg/pip/constraints.txt", "extra-index-url": "file:///opt/pypi/simple",
    }
    assert dict(conf["install"]) == {"index-url": "https://mirror.example/simple"}
    assert "cert" not in made.text  # in a session that path is the image's own bundle
    assert any("file:///opt/pypi-more/simple does not exist" in d for d in made.dropped)
    assert any("cache-dir" in d for d in made.dropped)
    assert sorted(pipconf.local_paths(made.text)) == ["/etc/xdg/pip/constraints.txt", "/opt/pypi", "/opt/wheels"]


def test_local_paths_of_an_admins_pip_conf():
    text = ("[global]\nindex-url = https://pypi.example/simple\nextra-index-url = file:///srv/py%20index/\n"
            "  https://other/simple\nfind_links = /srv/wheels/\n[install]\nconstraint = /etc/c.txt\n"
            "trusted-host = pypi.example\n")
    assert pipconf.local_paths(text) == ["/srv/py index", "/srv/wheels", "/etc/c.txt"]
    # PEP 503's layout: the pages under <root>/simple/ link to files beside it (../../files/x.whl).
    text = ("[global]\nextra-index-url = file:///opt/pypi/simple/ file:///simple\nfind-links = /srv/simple\n")
    assert pipconf.local_paths(text) == ["/opt/pypi", "/simple", "/srv/simple"]
    with pytest.raises(ValueError, match="not a pip configuration"):
        pipconf.local_paths("index-url = x")  # no section


def test_no_cert_and_nothing_local():
    made = pipconf.session_config(pipconf.parse_list("global.index-url='https://pypi.example/simple'\n"),
                                  exists=lambda p: False)
    assert made.ca_bundle == "" and "index-url = https://pypi.example/simple" in made.text and not made.dropped


def test_this_hosts_configuration_is_written_for_sessions(tmp_path, capsys):
    """The run command's step (scripts/run-hub) on this machine: whatever pip here is set up with."""
    target = tmp_path / "session-pip.conf"
    assert pipconf.main([str(target)]) == 0
    lines = dict(line.split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["BAI_SESSION_PIP_CONFIG"] == str(target)
    ca = lines["BAI_SESSION_CA_BUNDLE"]
    assert ca == "" or ca.startswith("/")
    for path in pipconf.local_paths(target.read_text()):  # every local path it names exists here
        assert path.startswith("/") and os.path.exists(path), path
