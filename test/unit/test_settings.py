"""
Settings (merge, validation, derivation), the Kolla files they prepare, the
KVM probe on real devices and the sasldb reader on a real database.
"""

import json
import os
import pathlib
import subprocess

import pytest
import salt.utils.yaml

from conftest import ROOT, load_module

mod = load_module("modules", "nova_libvirt")
DEFAULTS = salt.utils.yaml.safe_load((ROOT / "nova_libvirt" / "defaults.yaml").read_text())
USABLE = {"usable": True, "reason": ""}
FACTS = {
    "nodename": "compute01",
    "osarch": "x86_64",
    "interfaces": {"eth0": ["192.0.2.10"], "eth1": ["2001:db8::10"], "lo": ["127.0.0.1"]},
    "default_interface": "eth0",
    "kvm": USABLE,
}


@pytest.fixture
def configure_loader_modules():
    return {mod: {"__grains__": {"virtual": "kvm"}, "__opts__": {"test": False}}}


def build(pillar, **facts):
    merged, errors = mod._merge_and_validate(DEFAULTS, pillar)
    assert errors == []
    cfg, errors = mod._derive(merged, {**FACTS, **facts})
    return cfg, errors


def test_every_default_has_a_rule_and_defaults_validate():
    merged, errors = mod._merge_and_validate(DEFAULTS, {})
    assert errors == []
    assert {key for key, _ in mod._flatten(merged)} == set(mod.RULES)


def test_all_errors_reported_at_once_naming_keys():
    _, errors = mod._merge_and_validate(
        DEFAULTS, {"virt_type": "xen", "sasl": {"pasword": "x"}, "qemu": {"max_files": 0}, "tls": {"enabled": 1}}
    )
    assert errors == [
        "nova_libvirt:sasl:pasword: unknown key; expected one of: authname, enabled, mech_list, password, sasldb_path",
        'nova_libvirt:virt_type: "xen" is not valid; expected one of kvm, qemu, auto',
        "nova_libvirt:tls:enabled: 1 is not valid; expected true or false",
        "nova_libvirt:qemu:max_files: 0 is not valid; expected a whole number above 0",
    ]


def test_secret_values_are_never_echoed():
    _, errors = mod._merge_and_validate(DEFAULTS, {"sasl": {"password": "two\nlines-secret"}})
    assert errors == [
        "nova_libvirt:sasl:password: (hidden) is not valid; "
        "expected a non-empty string without newlines or leading/trailing blanks"
    ]


def test_tcp_defaults_render_kollas_files():
    cfg, errors = build({"sasl": {"password": "pw"}})
    assert errors == []
    assert cfg["port"] == 16509 and cfg["listen_address"] == "192.0.2.10"
    assert cfg["connection_uri"] == "qemu+tcp://192.0.2.10/system"
    assert cfg["render"]["libvirtd_conf"] == [
        "listen_tcp = 1",
        "listen_tls = 0",
        'auth_tcp = "sasl"',
        'tcp_port = "16509"',
        'ca_file = ""',
        "log_level = 3",
        'log_outputs = "3:file:/var/log/kolla/libvirt/libvirtd.log"',
        'listen_addr = "192.0.2.10"',
        "max_workers = 50",
        "max_client_requests = 20",
    ]
    assert cfg["render"]["qemu_conf"] == [
        'stdio_handler = "logd"',
        'user = "nova"',
        'group = "nova"',
        "max_files = 32768",
        "max_processes = 131072",
    ]
    assert cfg["render"]["sasl_conf"] == ["mech_list: DIGEST-MD5", "sasldb_path: /etc/libvirt/passwd.db"]
    assert cfg["render"]["nova_conf"]["libvirt"] == [
        'connection_uri = "qemu+tcp://192.0.2.10/system"',
        'live_migration_inbound_addr = "192.0.2.10"',
        "virt_type = kvm",
        "num_pcie_ports = 16",
    ]
    assert [f["dest"] for f in cfg["render"]["config_json"]["config_files"]] == [
        "/etc/libvirt/libvirtd.conf",
        "/etc/libvirt/qemu.conf",
        "/etc/sasl2/libvirt.conf",
        "/root/.config/libvirt/auth.conf",
    ]


def test_tls_switches_port_mechanism_uri_and_files():
    cfg, _ = build({"tls": {"enabled": True}, "sasl": {"password": "pw"}, "libvirtd": {"debug": True}})
    assert cfg["port"] == 16514
    assert cfg["sasl"]["mech_list"] == ["SCRAM-SHA-256"]
    assert cfg["connection_uri"] == "qemu+tls://compute01/system"
    lines = cfg["render"]["libvirtd_conf"]
    assert lines[:7] == [
        "listen_tls = 1",
        "listen_tcp = 0",
        'tls_port = "16514"',
        'key_file = "/etc/pki/libvirt/private/serverkey.pem"',
        'cert_file = "/etc/pki/libvirt/servercert.pem"',
        'ca_file = "/etc/pki/CA/cacert.pem"',
        'auth_tls = "sasl"',
    ]
    assert "log_level = 1" in lines
    assert cfg["render"]["nova_conf"]["libvirt"][:3] == [
        'connection_uri = "qemu+tls://compute01/system"',
        'live_migration_scheme = "tls"',
        'live_migration_inbound_addr = "compute01"',
    ]
    dests = [f["dest"] for f in cfg["render"]["config_json"]["config_files"]]
    assert "/etc/pki/libvirt/private/serverkey.pem" in dests and "/etc/pki/CA/cacert.pem" in dests


def test_sasl_off_means_auth_none_and_no_password_needed():
    cfg, errors = build({"sasl": {"enabled": False}})
    assert errors == []
    assert 'auth_tcp = "none"' in cfg["render"]["libvirtd_conf"]
    assert all("sasl" not in f["dest"] for f in cfg["render"]["config_json"]["config_files"])


def test_ipv6_address_is_bracketed_and_other_port_kept():
    cfg, _ = build({"migration_interface": "eth1", "port": 16600, "sasl": {"password": "pw"}})
    assert cfg["listen_address"] == "2001:db8::10"
    assert cfg["connection_uri"] == "qemu+tcp://[2001:db8::10]:16600/system"


def test_extra_options_replace_in_place_then_append():
    cfg, _ = build({"sasl": {"password": "pw"}, "libvirtd": {"extra": {"max_workers": 80, "keepalive_count": 9}}})
    lines = cfg["render"]["libvirtd_conf"]
    assert lines[-3:] == ["max_workers = 80", "max_client_requests = 20", "keepalive_count = 9"]


def test_aarch64_defaults_to_host_passthrough():
    cfg, _ = build({"sasl": {"password": "pw"}}, osarch="aarch64")
    assert "cpu_mode = host-passthrough" in cfg["render"]["nova_conf"]["libvirt"]


def test_kvm_unusable_is_an_error_with_the_reason_and_the_fix():
    merged, _ = mod._merge_and_validate(DEFAULTS, {"sasl": {"password": "pw"}})
    _, errors = mod._derive(merged, {**FACTS, "kvm": {"usable": False, "reason": "/dev/kvm does not exist"}})
    assert errors == [
        'nova_libvirt:virt_type: "kvm" but KVM is not usable on this host: /dev/kvm does not exist. '
        "Fix the host, or set virt_type: qemu (software emulation) or auto"
    ]


def test_auto_falls_back_to_qemu_and_says_why():
    cfg, errors = build({"virt_type": "auto", "sasl": {"password": "pw"}}, kvm={"usable": False, "reason": "no device"})
    assert errors == [] and cfg["virt_type"] == "qemu"
    assert cfg["virt_type_reason"] == "auto: falling back to qemu (TCG): no device"
    cfg, _ = build({"virt_type": "auto", "sasl": {"password": "pw"}})
    assert cfg["virt_type"] == "kvm"


def test_listen_address_needs_an_interface():
    merged, _ = mod._merge_and_validate(DEFAULTS, {"sasl": {"password": "pw"}})
    _, errors = mod._derive(merged, {**FACTS, "default_interface": None})
    assert errors[0].startswith("nova_libvirt:listen_address: cannot be derived")


def test_probe_kvm_on_this_hosts_device():
    probe = mod.probe_kvm()
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        # machines.md: usable here although /proc/cpuinfo has no vmx/svm.
        assert probe["usable"] is True and probe["api_version"] == 12, probe
    else:
        assert probe["usable"] is False and probe["reason"]


def test_probe_kvm_on_a_device_that_is_not_kvm():
    probe = mod.probe_kvm("/dev/null")
    assert probe["usable"] is False
    assert probe["reason"].startswith("KVM_GET_API_VERSION failed on /dev/null")


def test_probe_kvm_on_a_missing_device(tmp_path):
    probe = mod.probe_kvm(str(tmp_path / "kvm"))
    assert probe["usable"] is False and "does not exist" in probe["reason"]


def test_probe_kvm_without_permission(tmp_path):
    device = tmp_path / "kvm"
    device.write_text("")
    os.chmod(device, 0o000)
    probe = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(pathlib.Path(os.sys.executable)), "-c",
         f"import importlib.util,json;s=importlib.util.spec_from_file_location('m','{ROOT}/_modules/nova_libvirt.py');"
         f"m=importlib.util.module_from_spec(s);s.loader.exec_module(m);m.__grains__={{}};"
         f"print(json.dumps(m.probe_kvm('/dev/kvm')))"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(probe.stdout)
    assert result["usable"] is False and "not readable and writable by uid 65534" in result["reason"]


def test_sasldb_reader_on_a_real_database(tmp_path):
    db = tmp_path / "passwd.db"
    secrets = {"kolla": "pw with spaces\\and=signs", "other": "ünïcode-pw"}
    for user, password in secrets.items():
        subprocess.run(["saslpasswd2", "-c", "-p", "-a", "libvirt", "-f", str(db), user], input=password, text=True, check=True)
    entries = mod._sasldb_entries(str(db))
    assert {user: pw for (user, _), pw in entries.items()} == secrets
    diff = mod.sasl_user_diff("kolla", "pw with spaces\\and=signs", str(db))
    assert diff == {"create": False, "rotate": False, "remove": [f"other@{next(iter(entries))[1]}"]}
    assert mod.sasl_user_diff("kolla", "new", str(db))["rotate"] is True
    mod.sasl_user_set("kolla", "new", str(db))
    assert {u for u, _ in mod._sasldb_entries(str(db))} == {"kolla"}
    assert mod.sasl_user_diff("kolla", "new", str(db)) == {"create": False, "rotate": False, "remove": []}
    assert oct(db.stat().st_mode & 0o777) == "0o600"


def test_auth_conf_text_is_kollas():
    assert mod.auth_conf_text("kolla", "pw") == (
        "[credentials-default]\nauthname=kolla\npassword=pw\n\n[auth-libvirt-default]\ncredentials=default\n"
    )


def test_config_json_is_json_serialisable():
    cfg, _ = build({"sasl": {"password": "pw"}, "tls": {"enabled": True}})
    assert json.loads(json.dumps(cfg["render"]["config_json"]))["command"] == "/usr/local/bin/kolla_nova_libvirt_start"


def test_pillar_example_documents_every_key_and_validates():
    example = salt.utils.yaml.safe_load((ROOT / "pillar.example").read_text())["nova_libvirt"]
    merged, errors = mod._merge_and_validate(DEFAULTS, example)
    assert errors == []

    def keys(tree, path=""):
        for key, value in tree.items():
            where = f"{path}:{key}" if path else key
            if where not in mod.RULES and isinstance(value, dict):
                yield from keys(value, where)
            else:
                yield where

    assert set(keys(example)) == set(mod.RULES)


def test_container_spec_is_kollas():
    cfg, _ = build({"sasl": {"password": "pw"}, "container": {"extra_volumes": ["/srv/a:/srv/a"]}})
    spec = cfg["container"]
    assert spec["image_ref"] == "quay.io/openstack.kolla/nova-libvirt:2026.1-rocky-10"
    assert spec["engine_url"] == "unix:///var/run/docker.sock"
    assert spec["binds"] == [
        "/etc/kolla/nova-libvirt:/var/lib/kolla/config_files:ro",
        "/lib/modules:/lib/modules:ro",
        "/run:/run:shared",
        "/dev:/dev",
        "/sys/fs/cgroup:/sys/fs/cgroup",
        "libvirtd:/var/lib/libvirt",
        "nova_libvirt_qemu:/etc/libvirt/qemu",
        "nova_libvirt_secrets:/etc/libvirt/secrets",
        "kolla_logs:/var/log/kolla",
        "nova_compute:/var/lib/nova",
        "/srv/a:/srv/a",
    ]
    assert spec["kvm_udev_rule"] == 'KERNEL=="kvm", GROUP="42427", MODE="0660"'
    assert build({"sasl": {"password": "pw"}, "container": {"engine": "podman"}})[0]["container"]["engine_url"] == (
        "unix:///run/podman/podman.sock"
    )
