"""
`state.apply nova_libvirt.config` (Kolla's genconfig) in the default container
mode, pillar.example, and the KVM precheck against a host whose /dev/kvm is
not a KVM device.
"""

import json
import pathlib
import stat
import subprocess

import salt.utils.yaml

from conftest import PASSWORD, ROOT, changed, states, tree_snapshot


def container_pillar(base, **overrides):
    return {
        "config_dir": str(base / "kolla"),
        "listen_address": "127.0.0.1",
        "sasl": {"password": PASSWORD},
        **overrides,
    }


def test_genconfig_renders_every_kolla_file_and_nothing_else(masterless, tmp_path):
    ret = masterless.apply("nova_libvirt.config", pillar=container_pillar(tmp_path))
    assert ret.returncode == 0, ret.stdout
    assert PASSWORD not in ret.stdout + ret.stderr
    files = {
        str(p.relative_to(tmp_path / "kolla")): p for p in (tmp_path / "kolla").rglob("*") if p.is_file()
    }
    assert sorted(files) == [
        "nova-compute/auth.conf",
        "nova-compute/nova.conf.d/libvirt.conf",
        "nova-libvirt/auth.conf",
        "nova-libvirt/config.json",
        "nova-libvirt/libvirtd.conf",
        "nova-libvirt/qemu.conf",
        "nova-libvirt/sasl.conf",
    ]
    for name, path in files.items():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o640 if name.endswith("nova.conf.d/libvirt.conf") else 0o600), name
    auth = files["nova-libvirt/auth.conf"].read_text()
    assert f"authname=kolla\npassword={PASSWORD}\n" in auth
    assert files["nova-compute/auth.conf"].read_text() == auth
    config = json.loads(files["nova-libvirt/config.json"].read_text())
    assert config["command"] == "/usr/local/bin/kolla_nova_libvirt_start"
    assert {f["source"].rsplit("/", 1)[1] for f in config["config_files"]} == {
        "libvirtd.conf", "qemu.conf", "sasl.conf", "auth.conf",
    }
    assert 'listen_addr = "127.0.0.1"' in files["nova-libvirt/libvirtd.conf"].read_text()
    # Only config_dir: no sasldb, no host config.
    assert not pathlib.Path(tmp_path / "sasl").exists()

    again = masterless.apply("nova_libvirt.config", pillar=container_pillar(tmp_path))
    assert changed(again) == {}


def test_genconfig_test_mode_reports_every_file_and_writes_nothing(masterless, tmp_path):
    ret = masterless.apply("nova_libvirt.config", pillar=container_pillar(tmp_path), test=True)
    assert ret.returncode == 0
    results = states(ret)
    assert len(results) == 7
    assert all(st["result"] is None and st["changes"] for st in results.values()), results
    assert tree_snapshot(tmp_path) == {}


def test_pillar_example_renders(masterless, tmp_path):
    example = salt.utils.yaml.safe_load((ROOT / "pillar.example").read_text())["nova_libvirt"]
    example["config_dir"] = str(tmp_path / "kolla")  # everything else as documented
    ret = masterless.apply("nova_libvirt.config", pillar=example, test=True)
    assert ret.returncode == 0, ret.stdout
    results = states(ret)
    assert all(st["result"] is None for st in results.values())
    assert results["nova_libvirt-config-libvirtd-conf-file-managed"]["changes"]["newfile"]
    rendered = masterless.run("nova_libvirt.settings").data["render"]["libvirtd_conf"]
    assert rendered[-1] == "keepalive_interval = 5"
    assert tree_snapshot(tmp_path) == {}


def test_kvm_precheck_fails_on_a_host_without_kvm_and_writes_nothing(masterless, tmp_path):
    """A private mount namespace where /dev/kvm is /dev/null: a real device that is not KVM."""
    masterless.set_pillar(container_pillar(tmp_path))
    salt_call = [
        str(ROOT / ".venv" / "bin" / "salt-call"), "-c", str(masterless.minion.config_dir),
        "--local", "--out=json", "state.apply", "nova_libvirt",
    ]
    script = 'mount --bind /dev/null /dev/kvm && exec "$@"'
    ret = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *salt_call], capture_output=True, text=True)
    assert ret.returncode != 0
    assert (
        'nova_libvirt:virt_type: "kvm" but KVM is not usable on this host: KVM_GET_API_VERSION failed on /dev/kvm'
        in ret.stdout + ret.stderr
    )
    assert "set virt_type: qemu (software emulation) or auto" in ret.stdout + ret.stderr
    assert tree_snapshot(tmp_path) == {}

    masterless.set_pillar(container_pillar(tmp_path, virt_type="auto"))
    ret = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *salt_call[:-2], "nova_libvirt.settings"],
        capture_output=True, text=True, check=True,
    )
    settings = next(iter(json.loads(ret.stdout).values()))
    assert settings["virt_type"] == "qemu"
    assert settings["virt_type_reason"].startswith("auto: falling back to qemu (TCG): KVM_GET_API_VERSION failed")
    assert settings["sasl"]["password"] == "<hidden>"
