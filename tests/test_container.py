"""The session container as plain data (bai_spawner.container), against literal dicts,
and BaiSpawner.create_object with dockerspawner's callable extras."""
import asyncio

import docker
import pytest
from tornado import web

from bai_scheduler.contract.options import SessionOptions
from bai_scheduler.core.model import GpuBackend
from bai_scheduler.core.units import FgpuUnits
from bai_spawner.container import ContainerSpecError, Hardening, PackageIndex, Session, make_container
from bai_spawner.gpu import gpu_spec
from bai_spawner.spawner import BaiSpawner
from helpers.spawner import make_spawner

UNITS = FgpuUnits(2, "0.5")
GIB = 1024**3
OPTS = SessionOptions("bai/sklearn:1.6.1", 1, 1500, 2 * GIB)
SESSION = Session("alice", "s1", "req-1", "bai", OPTS)


def gpu(quanta=1, simulated=False, backend="hami"):
    return gpu_spec({
        "node": "n1", "simulated": simulated, "gpu": GpuBackend(backend).to_json(),
        "shares": [{"device": "GPU-a", "quanta": quanta, "index": 0, "memory_bytes": 8 * GIB, "capacity": 4}]
        if quanta else [],
    }, UNITS)


def build(**kw):
    args = dict(name="bai-alice--s1", image="bai/sklearn:1.6.1", command=["jupyterhub-singleuser"],
                environment={"JUPYTERHUB_API_TOKEN": "t"}, port=8888, session=SESSION, gpu=gpu(),
                hardening=Hardening(), network_name="bridge",
                volume_binds={"bai-home-alice": {"bind": "/home/jovyan", "mode": "rw"}})
    args.update(kw)
    return make_container(**args)


def test_a_hami_session_container():
    create, host = build()
    assert create == {
        "image": "bai/sklearn:1.6.1",
        "name": "bai-alice--s1",
        "command": ["jupyterhub-singleuser"],
        "environment": {
            "JUPYTERHUB_API_TOKEN": "t",
            "BAI_FGPU": "0.5", "BAI_GPU_BACKEND": "hami", "NVIDIA_VISIBLE_DEVICES": "GPU-a",
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "BAI_GPU_MEMORY_BYTES": str(2 * GIB),
            "CUDA_DEVICE_MEMORY_LIMIT_0": "2048m", "CUDA_DEVICE_SM_LIMIT_0": "25",
            "CUDA_DEVICE_MEMORY_SHARED_CACHE": "/run/bai-vgpu/cudevshr.cache",
            "LD_PRELOAD": "/usr/local/vgpu/libvgpu.so",
            "BAI_SESSION": "alice/s1",
        },
        "labels": {
            "org.bai-hub.node": "n1", "org.bai-hub.devices": "GPU-a", "org.bai-hub.quanta": "1",
            "org.bai-hub.fgpu": "0.5", "org.bai-hub.user": "alice", "org.bai-hub.server": "s1",
            "org.bai-hub.request-id": "req-1", "org.bai-hub.hub": "bai",
            "org.bai-hub.image": "bai/sklearn:1.6.1", "org.bai-hub.cpu-millis": "1500",
            "org.bai-hub.memory-bytes": str(2 * GIB),
        },
        "volumes": ["/home/jovyan"],
        "ports": {"8888/tcp": None},
    }
    assert host == {
        "auto_remove": True,
        "binds": ["bai-home-alice:/home/jovyan:rw"],
        "links": {},
        "cap_drop": ["ALL"], "cap_add": [], "init": True, "pids_limit": 4096,
        "security_opt": ["no-new-privileges:true"],
        "mem_limit": 2 * GIB,
        "cpu_period": 100_000, "cpu_quota": 150_000,
        "port_bindings": {8888: ("127.0.0.1",)},
        "tmpfs": {"/run/bai-vgpu": "mode=1777"},
        "network_mode": "bridge",
        "mounts": [
            {"Type": "bind", "Source": "/usr/local/vgpu/libvgpu.so", "Target": "/usr/local/vgpu/libvgpu.so",
             "ReadOnly": True},
            {"Type": "bind", "Source": "/tmp/vgpulock", "Target": "/tmp/vgpulock", "ReadOnly": False},
        ],
        "device_requests": [{"Driver": "nvidia", "Count": 0, "DeviceIDs": ["GPU-a"],
                             "Capabilities": [["gpu", "compute", "utility"]], "Options": {}}],
    }


def test_a_cpu_only_session_without_limits_or_hardening():
    opts = SessionOptions("bai/sklearn:1.6.1", 0, 0, 0)
    create, host = build(session=Session("bob", "", "r", "bai", opts), gpu=gpu(0),
                         hardening=Hardening(pids_limit=0, cap_drop=(), no_new_privileges=False, init=False),
                         volume_binds={}, host_ip=None)
    assert create["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert create["environment"]["BAI_SESSION"] == "bob"
    assert create["labels"]["org.bai-hub.cpu-millis"] == "0" and create["volumes"] == []
    assert host == {"auto_remove": True, "binds": [], "links": {}, "cap_drop": [], "cap_add": [],
                    "init": False, "network_mode": "bridge"}


def test_admin_binds_and_mounts_are_kept_beside_the_gpu_mounts():
    """Today's spawner replaced an admin's extra_host_config binds with the GPU binds."""
    create, host = build(
        extra_host_config={"binds": {"/srv/data": {"bind": "/data", "mode": "ro"}},
                           "mounts": [{"Type": "bind", "Source": "/srv/models", "Target": "/models", "ReadOnly": True}]},
        mounts=[{"Type": "volume", "Source": "scratch", "Target": "/scratch", "ReadOnly": False}],
    )
    assert host["binds"] == ["bai-home-alice:/home/jovyan:rw", "/srv/data:/data:ro"]
    assert [m["Target"] for m in host["mounts"]] == ["/scratch", "/models", "/usr/local/vgpu/libvgpu.so",
                                                     "/tmp/vgpulock"]
    assert create["volumes"] == ["/data", "/home/jovyan"]
    _, listed = build(extra_host_config={"binds": ["/srv/data:/data:ro", "bai-home-alice:/home/jovyan:rw"]})
    assert listed["binds"] == ["bai-home-alice:/home/jovyan:rw", "/srv/data:/data:ro"]


def test_admin_extras_cannot_undo_a_limit_or_swap_the_image():
    create, host = build(
        extra_create_kwargs={"environment": {"LD_PRELOAD": "", "EXTRA": "1"}, "image": "evil:latest",
                             "labels": {"org.bai-hub.user": "mallory", "team": "ml"}, "user": "1000"},
        extra_host_config={"cap_add": ["SYS_PTRACE"], "security_opt": ["apparmor=unconfined"],
                           "tmpfs": {"/scratch": "size=1g"}, "shm_size": "1g", "cpu_period": 50_000},
    )
    env = create["environment"]
    assert env["LD_PRELOAD"] == "/usr/local/vgpu/libvgpu.so" and env["EXTRA"] == "1"
    assert create["image"] == "bai/sklearn:1.6.1" and create["user"] == "1000"
    assert create["labels"]["org.bai-hub.user"] == "alice" and create["labels"]["team"] == "ml"
    assert host["cap_add"] == ["SYS_PTRACE"] and host["cap_drop"] == ["ALL"]
    assert host["security_opt"] == ["no-new-privileges:true", "apparmor=unconfined"]
    assert host["tmpfs"] == {"/scratch": "size=1g", "/run/bai-vgpu": "mode=1777"}
    assert host["shm_size"] == "1g" and (host["cpu_period"], host["cpu_quota"]) == (50_000, 75_000)
    with pytest.raises(ContainerSpecError, match="device_requests"):
        build(extra_host_config={"device_requests": [{"Driver": "nvidia", "Count": -1}]})
    with pytest.raises(ContainerSpecError, match="/tmp/vgpulock"):
        build(extra_host_config={"binds": ["/tmp:/tmp/vgpulock:rw"]})
    listed = build(extra_create_kwargs={"environment": ["A=1", "CUDA_DEVICE_SM_LIMIT_0=100"]})[0]["environment"]
    assert listed["A"] == "1" and listed["CUDA_DEVICE_SM_LIMIT_0"] == "25"


def test_the_package_index_is_mounted_read_only_and_names_the_ca():
    """Issue 14 (2): `pip install` in a session failed on the site's self-signed proxy CA."""
    index = PackageIndex("/srv/bai/session-pip.conf", "/etc/ssl/certs/ca-certificates.crt",
                         ("/opt/wheels", "/opt/pypi/simple"))
    create, host = build(package_index=index, environment={"JUPYTERHUB_API_TOKEN": "t", "REQUESTS_CA_BUNDLE": "/mine"})
    assert host["binds"] == ["bai-home-alice:/home/jovyan:rw", "/opt/wheels:/opt/wheels:ro",
                             "/opt/pypi/simple:/opt/pypi/simple:ro", "/srv/bai/session-pip.conf:/etc/pip.conf:ro",
                             "/etc/ssl/certs/ca-certificates.crt:/etc/bai/ca-certificates.crt:ro"]
    # Binds, but no volumes: a snapshot (docker commit) would keep them as VOLUMEs of the image.
    assert create["volumes"] == ["/home/jovyan"]
    env = create["environment"]
    assert {k: env[k] for k in ("PIP_CERT", "SSL_CERT_FILE", "CURL_CA_BUNDLE")} == dict.fromkeys(
        ("PIP_CERT", "SSL_CERT_FILE", "CURL_CA_BUNDLE"), "/etc/bai/ca-certificates.crt")
    assert env["REQUESTS_CA_BUNDLE"] == "/mine"  # the admin's own environment wins
    _, plain = build()
    assert plain["binds"] == ["bai-home-alice:/home/jovyan:rw"]
    with pytest.raises(ContainerSpecError, match="/etc/pip.conf is needed for the sessions' package index"):
        build(package_index=index, extra_host_config={"binds": ["/x/pip.conf:/etc/pip.conf:ro"]})


# ---------------------------------------------------------------- BaiSpawner.create_object in-process
class Recorder:
    """Stands in for the Docker engine: records the volumes made and what create_container gets."""

    def __init__(self):
        self.api = docker.APIClient(base_url="unix:///nonexistent.sock", version="1.41")
        self.created = None
        self.volumes = {}

    async def docker(self, method, *args, **kwargs):
        if method == "inspect_volume":
            if args[0] not in self.volumes:
                raise docker.errors.NotFound("no such volume")
            return self.volumes[args[0]]
        if method == "create_volume":
            self.volumes[args[0]] = {"Driver": kwargs["driver"], "Options": kwargs["driver_opts"]}
            return self.volumes[args[0]]
        if method == "inspect_container":
            return {"Id": args[0], "Image": "sha256:validated"}
        assert method == "create_container"
        self.created = kwargs
        return {"Id": "c1"}


def spawner_with_recorder(monkeypatch, **config):
    spawner = make_spawner("alice", "s1", **config)
    rec = Recorder()
    spawner.docker = rec.docker
    monkeypatch.setitem(BaiSpawner._clients, "", rec.api)  # the local engine's client, for this test only
    spawner.get_env = lambda: {"JUPYTERHUB_API_TOKEN": "t"}
    spawner.request_id = "req-1"
    spawner.image = "bai/sklearn:1.6.1"
    spawner._gpu = gpu()
    spawner._opts = OPTS
    return spawner, rec


@pytest.mark.parametrize("kind", ["dict", "callable", "async"])
def test_create_object_takes_callable_extras_and_keeps_admin_binds(kind, monkeypatch):
    extra = {"binds": {"/srv/data": {"bind": "/data", "mode": "ro"}}, "shm_size": "1g"}

    async def later(spawner):
        return extra

    value = {"dict": extra, "callable": lambda spawner: extra, "async": later}[kind]
    spawner, rec = spawner_with_recorder(monkeypatch, extra_host_config=value,
                                         extra_create_kwargs=lambda spawner: {"labels": {"who": spawner.user.name}})
    asyncio.run(spawner.create_object())
    host = rec.created["host_config"]
    assert "/srv/data:/data:ro" in host["Binds"]
    assert any(b.endswith(":/home/jovyan:rw") for b in host["Binds"])
    assert host["ShmSize"] == 1024**3 and host["PidsLimit"] == 4096 and host["CapDrop"] == ["ALL"]
    assert host["Init"] is True and host["SecurityOpt"] == ["no-new-privileges:true"]
    assert [m["Target"] for m in host["Mounts"]] == ["/usr/local/vgpu/libvgpu.so", "/tmp/vgpulock"]
    assert host["DeviceRequests"][0]["DeviceIDs"] == ["GPU-a"]
    assert rec.created["labels"]["who"] == "alice" and rec.created["labels"]["org.bai-hub.cpu-millis"] == "1500"
    assert rec.created["image"] == "bai/sklearn:1.6.1"
    assert rec.volumes == {"bai-home-alice": {"Driver": "local", "Options": None}}


def test_the_home_volume_is_made_with_the_configured_driver_and_options(monkeypatch):
    nfs = {"type": "nfs", "o": "addr=10.0.0.5,rw", "device": ":/export/home/{username}"}
    spawner, rec = spawner_with_recorder(monkeypatch, volume_driver_options=nfs)
    asyncio.run(spawner.create_object())
    assert rec.volumes == {"bai-home-alice": {"Driver": "local", "Options": {**nfs, "device": ":/export/home/alice"}}}
    assert spawner.volumes_are_shared
    asyncio.run(spawner.create_object())  # made once; then used as it is
    assert len(rec.volumes) == 1


def test_a_container_of_another_image_than_the_validated_one_is_removed(monkeypatch):
    spawner, rec = spawner_with_recorder(monkeypatch)
    spawner._allowed_id = "sha256:other"
    removed = []
    inner = rec.docker

    async def engine(method, *args, **kwargs):
        if method == "remove_container":
            removed.append(args[0])
            return None
        return await inner(method, *args, **kwargs)

    spawner.docker = engine
    with pytest.raises(web.HTTPError) as e:
        asyncio.run(spawner.create_object())
    assert e.value.status_code == 409 and "not the image that was validated" in e.value.log_message
    assert removed == ["c1"]


def test_create_object_hardening_options(monkeypatch):
    spawner, rec = spawner_with_recorder(monkeypatch, pids_limit=256, cap_add=["CHOWN"], no_new_privileges=False,
                                         use_init=False)
    asyncio.run(spawner.create_object())
    host = rec.created["host_config"]
    assert host["PidsLimit"] == 256 and host["CapAdd"] == ["CHOWN"] and host["CapDrop"] == ["ALL"]
    assert "SecurityOpt" not in host and host.get("Init") in (None, False)


def test_create_object_mounts_the_sessions_pip_config_and_what_it_names(monkeypatch, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    conf = tmp_path / "session-pip.conf"
    conf.write_text(f"[global]\nfind-links = {wheels}\nindex-url = https://pypi.example/simple\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    spawner, rec = spawner_with_recorder(monkeypatch, pip_config=str(conf), ca_bundle=str(ca))
    asyncio.run(spawner.create_object())
    binds = rec.created["host_config"]["Binds"]
    assert f"{wheels}:{wheels}:ro" in binds and f"{conf}:/etc/pip.conf:ro" in binds
    assert f"{ca}:/etc/bai/ca-certificates.crt:ro" in binds
    assert rec.created["environment"]["PIP_CERT"] == "/etc/bai/ca-certificates.crt"
    with pytest.raises(Exception, match="must be the absolute path of a file on this host"):
        make_spawner(pip_config=str(tmp_path / "missing.conf"))
