"""
The formula applied masterless in host mode with the host daemon managed,
against a real libvirtd started from the files it rendered, with the SASL
user its state made, and real KVM and TCG guests.
"""

import os
import stat
import subprocess

import pytest

from conftest import PASSWORD, Libvirtd, changed, domain_xml, states, tree_snapshot, with_overrides

PORT = 16599
URI = f"qemu+tcp://127.0.0.1:{PORT}/system"


def host_pillar(base, **overrides):
    pillar = {
        "config_dir": str(base / "kolla"),
        "listen_address": "127.0.0.1",
        "port": PORT,
        "container": {"enabled": False},
        "host": {
            "manage_daemon": True,
            "libvirtd_conf": str(base / "etc" / "libvirtd.conf"),
            "sasl_conf": str(base / "sasl2" / "libvirt.conf"),
            "service": None,  # no init system here: the fixture runs libvirtd
        },
        "sasl": {"password": PASSWORD, "sasldb_path": str(base / "sasl" / "passwd.db")},
        "libvirtd": {"log_dir": str(base / "log")},
    }
    return with_overrides(pillar, overrides)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("host")


@pytest.fixture(scope="module")
def first_apply(masterless, base):
    ret = masterless.apply(pillar=host_pillar(base))
    assert ret.returncode == 0, ret.stdout + ret.stderr
    return ret


@pytest.fixture(scope="module")
def libvirtd(first_apply, base):
    daemon = Libvirtd(base / "etc" / "libvirtd.conf", base / "sasl2", base)
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture
def guest(libvirtd, request):
    virt_type = getattr(request, "param", "kvm")
    name = f"guest-{virt_type}"
    xml = libvirtd.workdir / f"{name}.xml"
    xml.write_text(domain_xml(name, virt_type))
    libvirtd.virsh("define", str(xml))
    libvirtd.virsh("start", name)
    yield name
    libvirtd.virsh("destroy", name, check=False)
    libvirtd.virsh("undefine", name, check=False)


def test_first_apply_renders_kolla_files_at_host_paths(first_apply, base):
    assert all(st["result"] for st in states(first_apply).values())
    libvirtd_conf = (base / "etc" / "libvirtd.conf").read_text().splitlines()
    for line in (
        "listen_tcp = 1",
        "listen_tls = 0",
        'auth_tcp = "sasl"',
        f'tcp_port = "{PORT}"',
        'ca_file = ""',
        "log_level = 3",
        f'log_outputs = "3:file:{base}/log/libvirtd.log"',
        'listen_addr = "127.0.0.1"',
        "max_workers = 50",
        "max_client_requests = 20",
    ):
        assert line in libvirtd_conf
    assert (base / "sasl2" / "libvirt.conf").read_text().splitlines()[1:] == [
        "mech_list: DIGEST-MD5",
        f"sasldb_path: {base}/sasl/passwd.db",
    ]
    nova_conf = (base / "kolla" / "nova-compute" / "nova.conf.d" / "libvirt.conf").read_text()
    assert f'connection_uri = "{URI}"' in nova_conf
    assert 'live_migration_inbound_addr = "127.0.0.1"' in nova_conf
    assert "virt_type = kvm" in nova_conf
    # Host mode: Kolla writes only nova-compute's side into config_dir.
    assert not (base / "kolla" / "nova-libvirt").exists()
    for secret in (base / "kolla" / "nova-compute" / "auth.conf", base / "sasl" / "passwd.db", base / "etc" / "libvirtd.conf"):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
        assert secret.stat().st_uid == 0


def test_password_never_in_state_output(first_apply):
    assert PASSWORD not in first_apply.stdout
    assert PASSWORD not in first_apply.stderr


def test_sasl_user_made_by_the_state(first_apply, base):
    users = subprocess.run(
        ["sasldblistusers2", "-f", str(base / "sasl" / "passwd.db")], capture_output=True, text=True, check=True
    ).stdout
    assert users.split(":")[0].startswith("kolla@")
    assert states(first_apply)["nova_libvirt-host-sasl-user-present"]["changes"]["user"]["new"] == "kolla"


@pytest.mark.parametrize("guest", ["kvm", "qemu"], indirect=True)
def test_list_domains_sees_running_guest_over_tcp_sasl(masterless, guest, libvirtd):
    ret = masterless.run("nova_libvirt.list_domains")
    assert ret.returncode == 0, ret.stdout + ret.stderr
    (domain,) = [d for d in ret.data if d["name"] == guest]
    assert domain["state"] == "running" and domain["active"] and domain["id"] > 0
    running = masterless.run("nova_libvirt.running_domains").data
    assert [d["name"] for d in running] == [guest]


def test_shut_off_domain_listed_but_not_running(masterless, libvirtd):
    xml = libvirtd.workdir / "stopped.xml"
    xml.write_text(domain_xml("stopped"))
    libvirtd.virsh("define", str(xml))
    try:
        listed = {d["name"]: d for d in masterless.run("nova_libvirt.list_domains").data}
        assert listed["stopped"]["state"] == "shutoff"
        assert listed["stopped"]["active"] is False and listed["stopped"]["id"] is None
        assert "stopped" not in [d["name"] for d in masterless.run("nova_libvirt.running_domains").data]
    finally:
        libvirtd.virsh("undefine", "stopped")


def test_wrong_password_is_refused(masterless, libvirtd):
    ret = masterless.run("nova_libvirt.list_domains", f"uri={URI}", "authname=kolla", "password=not-the-password")
    assert ret.returncode != 0
    assert "SASL authentication failed" in ret.stdout + ret.stderr


def test_nothing_listening_is_explained(masterless, libvirtd):
    ret = masterless.run("nova_libvirt.list_domains", "uri=qemu+tcp://127.0.0.1:1/system", "authname=kolla", "password=x")
    assert ret.returncode != 0
    assert "nothing listens there" in ret.stdout + ret.stderr


def test_virsh_connects_with_nova_computes_auth_conf(libvirtd, base, guest):
    env = dict(os.environ, LIBVIRT_AUTH_FILE=str(base / "kolla" / "nova-compute" / "auth.conf"))
    out = subprocess.run(["virsh", "-c", URI, "list", "--name"], env=env, capture_output=True, text=True, check=True)
    assert guest in out.stdout.split()


def test_second_apply_changes_nothing(masterless, base, libvirtd):
    before = tree_snapshot(base)
    ret = masterless.apply(pillar=host_pillar(base))
    assert ret.returncode == 0
    assert changed(ret) == {}
    after = tree_snapshot(base)
    assert {k: v for k, v in after.items() if not k.startswith("log")} == {
        k: v for k, v in before.items() if not k.startswith("log")
    }


def test_test_mode_reports_without_writing(masterless, base, libvirtd):
    before = tree_snapshot(base)
    pillar = host_pillar(base, sasl={"password": "another-password-1"}, libvirtd={"max_workers": 64})
    ret = masterless.apply(pillar=pillar, test=True)
    assert ret.returncode == 0
    result = states(ret)
    assert result["nova_libvirt-host-sasl-user-present"]["result"] is None
    assert result["nova_libvirt-host-sasl-user-present"]["changes"] == {"password": "rotated"}
    assert result["nova_libvirt-config-compute-auth-conf-managed"]["result"] is None
    libvirtd_conf_id = [sid for sid in result if sid.endswith("libvirtd-conf-file-managed")][0]
    assert "+max_workers = 64" in result[libvirtd_conf_id]["changes"]["diff"]
    assert "another-password-1" not in ret.stdout + ret.stderr
    assert tree_snapshot(base) == before


def test_password_rotation_and_authname_change(masterless, base, libvirtd):
    rotated = host_pillar(base, sasl={"password": "rotated-password-2"})
    ret = masterless.apply(pillar=rotated)
    assert changed(ret)["nova_libvirt-host-sasl-user-present"] == {"password": "rotated"}
    assert masterless.run("nova_libvirt.list_domains").returncode == 0  # new auth.conf and sasldb agree
    old = masterless.run("nova_libvirt.list_domains", f"uri={URI}", "authname=kolla", f"password={PASSWORD}")
    assert old.returncode != 0

    renamed = host_pillar(base, sasl={"password": "rotated-password-2", "authname": "nova"})
    ret = masterless.apply(pillar=renamed)
    change = changed(ret)["nova_libvirt-host-sasl-user-present"]
    assert change["user"]["new"] == "nova"
    assert [u.split("@")[0] for u in change["removed"]] == ["kolla"]
    assert masterless.run("nova_libvirt.list_domains").returncode == 0
    assert "rotated-password-2" not in ret.stdout + ret.stderr
    # Back to the module's pillar for the tests that follow.
    assert masterless.apply(pillar=host_pillar(base)).returncode == 0


BAD_INPUT = [
    ({"virt_typo": "kvm"}, "nova_libvirt:virt_typo: unknown key"),
    ({"virt_type": "xen"}, 'nova_libvirt:virt_type: "xen" is not valid; expected one of kvm, qemu, auto'),
    ({"sasl": {"password": None}}, "nova_libvirt:sasl:password: missing"),
    ({"sasl": {"mech_list": ["MD5"]}}, "nova_libvirt:sasl:mech_list"),
    ({"port": 70000}, "nova_libvirt:port: 70000 is not valid"),
    ({"listen_address": "not-an-ip"}, "nova_libvirt:listen_address"),
    ({"listen_address": None, "migration_interface": "nosuch0"}, 'nova_libvirt:migration_interface: "nosuch0" has no IP'),
    ({"host": {"libvirtd_conf": "relative/path"}}, "nova_libvirt:host:libvirtd_conf"),
    ({"libvirtd": {"max_workers": "many"}}, "nova_libvirt:libvirtd:max_workers"),
    ({"tls": {"enabled": "yes"}}, "nova_libvirt:tls:enabled"),
]


@pytest.mark.parametrize("overrides,message", BAD_INPUT, ids=[m.split(":")[1].split(" ")[0] for _, m in BAD_INPUT])
def test_bad_input_fails_naming_the_key_and_writes_nothing(masterless, tmp_path, overrides, message):
    pillar = host_pillar(tmp_path, **overrides)
    ret = masterless.apply(pillar=pillar)
    assert ret.returncode != 0
    assert message in ret.stdout + ret.stderr
    assert tree_snapshot(tmp_path) == {}


def test_bad_password_is_not_echoed(masterless, tmp_path):
    ret = masterless.apply(pillar=host_pillar(tmp_path, sasl={"password": " padded-secret "}))
    assert ret.returncode != 0
    assert "nova_libvirt:sasl:password: (hidden) is not valid" in ret.stdout + ret.stderr
    assert "padded-secret" not in ret.stdout + ret.stderr
