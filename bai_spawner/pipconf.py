"""The package index sessions use: a pip configuration and a CA bundle from the host's.

``pip install`` in a session needs what pip on the hub's host has: the site's index or mirror,
its local wheel folders, and the CA that signs the site's HTTPS proxy. ``session_config``
turns the host's ``pip config list`` into a pip.conf for sessions (pure: the file system is
asked only through ``exists``):

* ``cert`` becomes the CA bundle (``BaiSpawner.ca_bundle``, mounted and named by PIP_CERT and
  friends), not a path in the pip.conf, where it would name the image's own bundle;
* options that name the index and its rules are kept (index and extra index URLs, find-links,
  trusted hosts, constraints, time-outs); options about the host itself (cache, log, target,
  client certificate) are not;
* local folders and files those options name (``file://`` indexes, find-links folders,
  constraint files) stay at their paths: ``local_paths`` lists them and the spawner mounts
  them read-only at the same place in every session; ones missing on the host are dropped.
  A local index in PEP 503's layout, ``<root>/simple/``, is mounted from ``<root>``: its pages
  link to the packages' files outside ``simple/`` (``../../files/x.whl``, as pip2pi and this
  machine's indexes do).

``python -m bai_spawner.pipconf FILE`` writes FILE from this host's configuration and prints the
two settings as ``BAI_SESSION_PIP_CONFIG=…`` and ``BAI_SESSION_CA_BUNDLE=…`` lines, which
scripts/run-hub exports for hub_config/jupyterhub_config.py.
"""
from __future__ import annotations

import argparse
import ast
import configparser
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

# Where a session finds them (read-only mounts).
PIP_CONFIG_TARGET = "/etc/pip.conf"
CA_BUNDLE_TARGET = "/etc/bai/ca-certificates.crt"
# What points pip, requests, curl and Python's ssl module at the CA bundle.
CA_ENV = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE")

# Options that describe the package index and how to use it; the values of those in
# PATH_OPTIONS may name local folders or files.
KEPT = {"index-url", "extra-index-url", "find-links", "trusted-host", "constraint", "timeout",
        "default-timeout", "retries", "no-index", "prefer-binary", "only-binary", "no-binary", "pre",
        "disable-pip-version-check", "progress-bar"}
PATH_OPTIONS = {"index-url", "extra-index-url", "find-links", "constraint"}
INDEX_OPTIONS = {"index-url", "extra-index-url"}


@dataclass(frozen=True)
class SessionPip:
    text: str  # the sessions' pip.conf
    ca_bundle: str  # the host's CA bundle, "" if pip has none configured
    dropped: tuple[str, ...]  # what was left out, and why


def parse_list(output: str) -> dict[str, dict[str, str]]:
    """``pip config list`` lines (``global.find-links='/opt/wheels'``, ``:env:.cert='…'``) as
    {section: {option: value}}, with the environment's values (``:env:``) over the files'
    ``global`` ones, as pip applies them."""
    found: dict[str, dict[str, str]] = {}
    for line in output.splitlines():
        key, sep, raw = line.partition("=")
        if not sep or "." not in key:
            continue
        section, _, option = key.rpartition(".")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip().strip("'\"")
        found.setdefault(section, {})[option.replace("_", "-")] = str(value)
    out = {s: dict(v) for s, v in found.items() if s not in (":env:", "global")}
    merged = {**found.get("global", {}), **found.get(":env:", {})}
    if merged:
        out["global"] = merged
    return out


def _local(entry: str) -> str | None:
    """The local path an index, find-links or constraint entry names, or None for a URL."""
    if entry.startswith("file:"):
        return unquote(urlparse(entry).path) or None
    return entry if entry.startswith("/") else None


def session_config(options: dict[str, dict[str, str]], exists=os.path.exists) -> SessionPip:
    """The sessions' pip.conf from the host's options (``parse_list``)."""
    parser = configparser.ConfigParser(interpolation=None)
    ca, dropped = "", []
    for section, values in sorted(options.items(), key=lambda kv: kv[0] != "global"):
        kept = {}
        for option, value in values.items():
            if option == "cert":
                if exists(value):
                    ca = ca or value
                else:
                    dropped.append(f"{section}.cert: {value} does not exist")
                continue
            if option not in KEPT:
                dropped.append(f"{section}.{option}: about the host, not the index")
                continue
            if option in PATH_OPTIONS:
                entries = []
                for entry in value.split():
                    path = _local(entry)
                    if path is not None and not exists(path):
                        dropped.append(f"{section}.{option}: {entry} does not exist here")
                        continue
                    entries.append(entry)
                if not entries:
                    continue
                value = " ".join(entries)
            kept[option] = value
        if kept:
            parser[section] = kept
    text = io.StringIO()
    text.write("# For BAI Hub sessions, from this host's pip configuration (bai_spawner/pipconf.py).\n")
    parser.write(text)
    return SessionPip(text.getvalue(), ca, tuple(dropped))


def local_paths(text: str) -> list[str]:
    """Local folders and files a pip.conf's index options name: mounted read-only at the same
    paths in sessions, so the configuration means the same there."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
    except configparser.Error as e:
        raise ValueError(f"not a pip configuration: {e}") from None
    out: list[str] = []
    for section in parser.sections():
        for option, value in parser[section].items():
            option = option.replace("_", "-")
            if option in PATH_OPTIONS:
                for entry in value.split():
                    path = _local(entry)
                    if not path:
                        continue
                    path = path.rstrip("/") or "/"
                    root, name = os.path.split(path)
                    if option in INDEX_OPTIONS and name == "simple" and root != "/":
                        path = root  # the pages link to files beside simple/
                    if path not in out:
                        out.append(path)
    return out


def host_options(python: str = sys.executable) -> dict[str, dict[str, str]]:
    """This host's pip configuration (files and PIP_* variables), by ``pip config list``."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"pip config list failed: {out.stderr.strip()[:300]}")
    return parse_list(out.stdout)


def write_for_sessions(path: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """Write the sessions' pip.conf to ``path`` from this host's configuration; the settings for
    hub_config/jupyterhub_config.py (``BAI_SESSION_PIP_CONFIG``, ``BAI_SESSION_CA_BUNDLE``) and
    what was left out."""
    made = session_config(host_options())
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(made.text)
    os.replace(tmp, path)
    return {"BAI_SESSION_PIP_CONFIG": os.path.abspath(path), "BAI_SESSION_CA_BUNDLE": made.ca_bundle}, made.dropped


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the sessions' pip.conf from this host's pip configuration.")
    p.add_argument("file", help="where to write the pip.conf (e.g. var/session-pip.conf)")
    args = p.parse_args(argv)
    settings, dropped = write_for_sessions(args.file)
    for reason in dropped:
        print(f"[bai-session-pip] left out {reason}", file=sys.stderr)
    for name, value in settings.items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
