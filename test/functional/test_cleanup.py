"""
The cleanup orchestration across a real master and two minions, each with
its own nova_libvirt container (names, volumes, /run and address of its own
on 127.0.0.0/8), and a host libvirtd for the guests' definitions to move to.
"""

import os
import subprocess

import docker
import pytest

from conftest import PASSWORD, Fleet, Libvirtd, domain_xml, remove_container, restore_kvm_device

pytestmark = pytest.mark.container
ENGINE_URL = "unix:///run/podman/podman.sock"
ADDRESSES = {"a": "127.0.0.2", "b": "127.0.0.3"}
PORT = 16640


def volumes(key):
    return {
        f"{key}_libvirtd": "/var/lib/libvirt",
        f"{key}_nova_libvirt_qemu": "/etc/libvirt/qemu",
        f"{key}_nova_libvirt_secrets": "/etc/libvirt/secrets",
        f"{key}_kolla_logs": "/var/log/kolla",
        f"{key}_nova_compute": "/var/lib/nova",
    }


def pillar(base, key, image):
    name, tag = image.rsplit(":", 1)
    (base / key / "run").mkdir(parents=True, exist_ok=True)
    return {
        "config_dir": str(base / key / "kolla"),
        "listen_address": ADDRESSES[key],
        "port": PORT,
        "sasl": {"password": PASSWORD},
        "qemu": {"max_files": 16000, "max_processes": 16000},
        "container": {
            "enabled": True,
            "engine": "podman",
            "engine_url": ENGINE_URL,
            "image": name,
            "tag": tag,
            "name": f"nova_libvirt_{key}",
            "volumes": volumes(key),
            "run_dir": str(base / key / "run"),
            "ulimits": {},
        },
    }


@pytest.fixture(scope="module")
def fleet(salt_factories, state_tree, tmp_path_factory, kolla_image):
    base = tmp_path_factory.mktemp("cleanup")
    pillars = {key: pillar(base, key, kolla_image) for key in ADDRESSES}
    engine = docker.APIClient(base_url=ENGINE_URL)
    with Fleet(salt_factories, state_tree, base, pillars) as fleet:
        fleet.engine = engine
        for key in ADDRESSES:
            ret = fleet.apply(key)
            assert ret.returncode == 0, ret.stdout
        yield fleet
    for key in ADDRESSES:
        remove_container(engine, f"nova_libvirt_{key}", volumes(key))
    restore_kvm_device()


@pytest.fixture(scope="module")
def host_libvirtd(fleet):
    conf = fleet.base / "host-libvirtd.conf"
    conf.write_text("listen_tls = 0\nlisten_tcp = 0\n")
    daemon = Libvirtd(conf, None, fleet.base, listen=False)
    daemon.start()
    yield daemon
    daemon.stop()


def virsh(fleet, key, *args):
    env = dict(os.environ, LIBVIRT_AUTH_FILE=str(fleet.base / key / "kolla" / "nova-compute" / "auth.conf"))
    uri = f"qemu+tcp://{ADDRESSES[key]}:{PORT}/system"
    return subprocess.run(["virsh", "-c", uri, *args], env=env, capture_output=True, text=True, check=True)


def exists(fleet, container=None, volume=None):
    try:
        fleet.engine.inspect_container(container) if container else fleet.engine.inspect_volume(volume)
    except docker.errors.NotFound:
        return False
    return True


def orchestrate(fleet, target, test=False):
    args = ["state.orchestrate", "nova_libvirt.orch.cleanup", f'pillar={{"target": "{target}"}}']
    ret = fleet.run.run(*args, *(["test=True"] if test else []))
    data = ret.data["data"] if isinstance(ret.data, dict) and "data" in ret.data else ret.data
    step = next(iter(next(iter(data.values())).values())) if isinstance(data, dict) else {}
    return ret, step


def host_result(step, fleet, key):
    return {sid.split("_|-")[1]: st for sid, st in step["changes"]["ret"][fleet.ids[key]].items()}


@pytest.fixture(scope="module")
def disabled(fleet, host_libvirtd, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guests")
    (tmp / "busy.xml").write_text(domain_xml("busy", "qemu"))
    virsh(fleet, "a", "define", str(tmp / "busy.xml"))
    virsh(fleet, "a", "start", "busy")
    (tmp / "kept.xml").write_text(domain_xml("kept", "qemu"))
    virsh(fleet, "b", "define", str(tmp / "kept.xml"))
    for key in ADDRESSES:
        fleet.pillars[key]["container"]["enabled"] = False
    fleet.pillars["b"]["cleanup"] = {"keep_domains": True}
    fleet.write_pillar()
    fleet.cli.run("saltutil.refresh_pillar", "wait=True", minion_tgt="cmp-*")
    return fleet


def test_enabled_container_is_refused(fleet):
    ret, step = orchestrate(fleet, fleet.ids["a"])
    assert ret.returncode != 0
    refused = host_result(step, fleet, "a")["nova_libvirt-clean-container-enabled-refused"]
    assert "has not been cleaned up because it is enabled" in refused["comment"]
    assert exists(fleet, container="nova_libvirt_a")


def test_test_mode_predicts_and_changes_nothing(disabled):
    fleet = disabled
    ret, step = orchestrate(fleet, "cmp-*", test=True)
    assert exists(fleet, container="nova_libvirt_a") and exists(fleet, container="nova_libvirt_b")
    b = host_result(step, fleet, "b")
    assert b["nova_libvirt-clean-container-absent"]["result"] is None
    assert b["nova_libvirt-clean-domains-kept"]["changes"] == {"defined": ["kept"]}
    assert "busy" in host_result(step, fleet, "a")["nova_libvirt-clean-guests-absent"]["comment"]


def test_running_guest_refuses_that_host_only(disabled, host_libvirtd):
    fleet = disabled
    ret, step = orchestrate(fleet, "cmp-*")
    assert ret.returncode != 0
    assert fleet.ids["a"] in step["comment"] and fleet.ids["b"] not in step["comment"].split("\n")[0]
    a = host_result(step, fleet, "a")
    assert a["nova_libvirt-clean-guests-absent"]["result"] is False
    assert "Refusing to remove nova_libvirt_a with running guests: busy (found by libvirt API)" in (
        a["nova_libvirt-clean-guests-absent"]["comment"]
    )
    assert exists(fleet, container="nova_libvirt_a")
    assert all(exists(fleet, volume=v) for v in volumes("a"))
    assert (fleet.base / "a" / "kolla" / "nova-libvirt").exists()
    # b: cleaned, volumes kept (cleanup:remove_volumes is false), definitions moved
    assert not exists(fleet, container="nova_libvirt_b")
    assert all(exists(fleet, volume=v) for v in volumes("b"))
    assert not (fleet.base / "b" / "kolla" / "nova-libvirt").exists()
    assert (fleet.base / "b" / "kolla" / "nova-compute").exists()
    assert host_result(step, fleet, "b")["nova_libvirt-clean-domains-kept"]["changes"] == {"defined": ["kept"]}
    assert "kept" in host_libvirtd.virsh("list", "--all", "--name").stdout.split()


def test_second_run_on_a_clean_host_changes_nothing(disabled):
    ret, step = orchestrate(disabled, disabled.ids["b"])
    assert ret.returncode == 0, ret.stdout
    assert step["result"] is True and not step["changes"]


def test_volumes_removed_when_asked(disabled):
    fleet = disabled
    fleet.pillars["b"]["cleanup"]["remove_volumes"] = True
    fleet.write_pillar()
    fleet.cli.run("saltutil.refresh_pillar", "wait=True", minion_tgt=fleet.ids["b"])
    ret, _ = orchestrate(fleet, fleet.ids["b"])
    assert ret.returncode == 0, ret.stdout
    assert not any(exists(fleet, volume=v) for v in volumes("b"))


def test_running_vms_not_fatal_cleans_the_busy_host(disabled):
    fleet = disabled
    fleet.pillars["a"]["cleanup"] = {"running_vms_fatal": False}
    fleet.write_pillar()
    fleet.cli.run("saltutil.refresh_pillar", "wait=True", minion_tgt=fleet.ids["a"])
    ret, step = orchestrate(fleet, fleet.ids["a"])
    assert ret.returncode == 0, ret.stdout
    assert not exists(fleet, container="nova_libvirt_a")
    assert "busy" in host_result(step, fleet, "a")["nova_libvirt-clean-guests-absent"]["comment"]
    assert os.stat("/dev/kvm").st_gid != 42427  # the kvm fix-up is undone


def test_target_matching_no_minion_is_reported(fleet):
    ret, step = orchestrate(fleet, "no-such-minion-*")
    assert ret.returncode != 0
    assert step["result"] is False and "No minions returned" in step["comment"]


def test_missing_target_is_reported(fleet):
    ret = fleet.run.run("state.orchestrate", "nova_libvirt.orch.cleanup")
    assert ret.returncode != 0
    assert "Say which compute hosts to clean up" in ret.stdout


def test_offline_minion_is_reported_not_skipped(disabled):
    fleet = disabled
    fleet.minions["b"].terminate()
    try:
        ret, step = orchestrate(fleet, "cmp-*")
        assert ret.returncode != 0
        assert step["result"] is False
        assert f"Run failed on minions: {fleet.ids['b']}" in step["comment"]
    finally:
        fleet.minions["b"].start()
