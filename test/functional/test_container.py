"""
The default mode: Kolla's nova_libvirt container, run by the formula through
Podman's Docker Engine API, from an image built offline by
test/image/build-image.sh (no registry is reachable here).
"""

import os
import subprocess

import docker
import pytest

from conftest import (
    PASSWORD,
    changed,
    domain_xml,
    remove_container,
    restore_kvm_device,
    states,
    tree_snapshot,
    with_overrides,
)

PORT = 16630
URI = f"qemu+tcp://127.0.0.1:{PORT}/system"
ENGINE_URL = "unix:///run/podman/podman.sock"
VOLUMES = {
    "t_libvirtd": "/var/lib/libvirt",
    "t_nova_libvirt_qemu": "/etc/libvirt/qemu",
    "t_nova_libvirt_secrets": "/etc/libvirt/secrets",
    "t_kolla_logs": "/var/log/kolla",
    "t_nova_compute": "/var/lib/nova",
}

pytestmark = pytest.mark.container


@pytest.fixture(scope="module")
def image(kolla_image):
    return kolla_image


@pytest.fixture(scope="module")
def engine(image):
    client = docker.APIClient(base_url=ENGINE_URL)
    yield client
    remove_container(client, "nova_libvirt", VOLUMES)
    restore_kvm_device()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("container")


def container_pillar(base, image, **overrides):
    name, tag = image.rsplit(":", 1)
    pillar = {
        "config_dir": str(base / "kolla"),
        "listen_address": "127.0.0.1",
        "port": PORT,
        "sasl": {"password": PASSWORD},
        # This machine refuses to raise hard rlimits: Kolla's 32768/131072 cannot be set here.
        "qemu": {"max_files": 16000, "max_processes": 16000},
        "container": {
            "engine": "podman",
            "engine_url": ENGINE_URL,
            "image": name,
            "tag": tag,
            "volumes": VOLUMES,
            # Kolla's 64 MiB memlock is above this machine's hard limit (8 MiB); given limits
            # replace Podman's defaults, and this machine refuses higher nofile/nproc too.
            "ulimits": {"memlock": "8388608:8388608", "nofile": "16384:16384", "nproc": "16384:16384"},
        },
    }
    return with_overrides(pillar, overrides)


@pytest.fixture(scope="module")
def deployed(masterless, engine, image, base):
    ret = masterless.apply(pillar=container_pillar(base, image))
    assert ret.returncode == 0, ret.stdout
    return ret


def container_id(engine):
    return engine.inspect_container("nova_libvirt")["Id"]


def virsh(*args, base, check=True):
    env = dict(os.environ, LIBVIRT_AUTH_FILE=str(base / "kolla" / "nova-compute" / "auth.conf"))
    return subprocess.run(["virsh", "-c", URI, *args], env=env, capture_output=True, text=True, check=check)


def test_container_runs_with_kollas_settings(deployed, engine, base):
    data = engine.inspect_container("nova_libvirt")
    host = data["HostConfig"]
    assert data["State"]["Running"]
    assert host["Privileged"] is True
    assert host["NetworkMode"] == "host" and host["PidMode"] == "host"
    mounts = {m["Destination"]: m for m in data["Mounts"]}
    assert mounts["/var/lib/kolla/config_files"]["Source"] == str(base / "kolla" / "nova-libvirt")
    assert mounts["/var/lib/kolla/config_files"]["RW"] is False
    for destination in ("/lib/modules", "/run", "/dev", "/sys/fs/cgroup"):
        assert destination in mounts
    for volume, destination in VOLUMES.items():
        assert mounts[destination]["Name"] == volume
    assert "KOLLA_CONFIG_STRATEGY=COPY_ALWAYS" in data["Config"]["Env"]
    assert {"Name": "RLIMIT_MEMLOCK", "Soft": 8388608, "Hard": 8388608} in host["Ulimits"] or {
        "Name": "memlock", "Soft": 8388608, "Hard": 8388608} in host["Ulimits"], host["Ulimits"]
    assert states(deployed)["nova_libvirt-container-sasl-user-present"]["changes"]["user"]["new"] == "kolla"
    assert os.stat("/dev/kvm").st_gid == 42427


def test_kvm_guest_through_the_container_is_listed_running(deployed, masterless, base, tmp_path):
    xml = tmp_path / "guest.xml"
    xml.write_text(domain_xml("ctr-guest", "kvm"))
    virsh("define", str(xml), base=base)
    virsh("start", "ctr-guest", base=base)
    try:
        ret = masterless.run("nova_libvirt.running_domains")
        assert ret.returncode == 0, ret.stdout
        (guest,) = ret.data
        assert guest["name"] == "ctr-guest" and guest["state"] == "running"
        owner = subprocess.run(["ps", "-o", "user=", "-C", "qemu-system-x86_64"], capture_output=True, text=True)
        assert owner.stdout.split() == ["42436"]  # QEMU runs as the image's nova user, on KVM
    finally:
        virsh("destroy", "ctr-guest", base=base, check=False)
        virsh("undefine", "ctr-guest", base=base, check=False)


def test_wrong_password_refused_by_the_containers_libvirtd(deployed, masterless):
    ret = masterless.run("nova_libvirt.list_domains", f"uri={URI}", "authname=kolla", "password=wrong-one")
    assert ret.returncode != 0 and "SASL authentication failed" in ret.stdout + ret.stderr


def test_second_apply_changes_nothing_and_keeps_the_container(deployed, masterless, engine, image, base):
    before = container_id(engine)
    ret = masterless.apply(pillar=container_pillar(base, image))
    assert ret.returncode == 0
    assert changed(ret) == {}
    assert container_id(engine) == before


def test_test_mode_predicts_a_restart_and_changes_nothing(deployed, masterless, engine, image, base):
    before_id, before_tree = container_id(engine), tree_snapshot(base)
    ret = masterless.apply(pillar=container_pillar(base, image, libvirtd={"max_workers": 64}), test=True)
    assert ret.returncode == 0
    result = states(ret)
    assert result["nova_libvirt-config-libvirtd-conf-file-managed"]["result"] is None
    assert result["nova_libvirt-container-running"]["result"] is None
    assert container_id(engine) == before_id and tree_snapshot(base) == before_tree


def test_changed_setting_restarts_and_definitions_survive(deployed, masterless, engine, image, base, tmp_path):
    xml = tmp_path / "kept.xml"
    xml.write_text(domain_xml("kept-guest", "kvm"))
    virsh("define", str(xml), base=base)
    before = container_id(engine)
    ret = masterless.apply(pillar=container_pillar(base, image, libvirtd={"max_workers": 64}))
    assert ret.returncode == 0, ret.stdout
    assert container_id(engine) != before
    exec_id = engine.exec_create("nova_libvirt", ["grep", "max_workers", "/etc/libvirt/libvirtd.conf"])
    assert engine.exec_start(exec_id).decode().strip() == "max_workers = 64"
    # The SASL user was made again in the new container's sasldb; the domain
    # definition lives in the nova_libvirt_qemu volume.
    assert "nova_libvirt-container-sasl-user-present" in changed(ret)
    listed = {d["name"]: d for d in masterless.run("nova_libvirt.list_domains").data}
    assert listed["kept-guest"]["state"] == "shutoff"
    virsh("undefine", "kept-guest", base=base)


def test_missing_engine_is_a_clear_error_before_anything(masterless, image, tmp_path):
    pillar = container_pillar(tmp_path, image, container={"engine_url": "unix:///run/nowhere/podman.sock"})
    ret = masterless.apply(pillar=pillar)
    assert ret.returncode != 0
    assert "no podman engine answers at unix:///run/nowhere/podman.sock" in ret.stdout + ret.stderr
    assert tree_snapshot(tmp_path) == {}
