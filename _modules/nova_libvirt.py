"""
Execution module of the ``nova_libvirt`` formula: settings, KVM probe, domains
and the SASL database of the libvirt that Nova uses.

:depends: libvirt-python, only for :py:func:`list_domains` and
          :py:func:`running_domains` (imported when they are called, so the
          rest of the formula works without it); ``db_dump`` and
          ``saslpasswd2`` (Debian: ``db5.3-util``, ``sasl2-bin``) for the SASL
          functions.

Everything the formula renders comes from :py:func:`settings`: the pillar
under ``nova_libvirt:`` merged once over ``nova_libvirt/defaults.yaml``,
validated (an unknown key or a bad value is an error that names it), with the
derived values (port, SASL mechanisms, listen address, connection URI, virt
type from a real probe of ``/dev/kvm``) filled in and every file's lines
prepared, so templates only print.

CLI Examples:

.. code-block:: bash

    salt-call nova_libvirt.settings
    salt-call nova_libvirt.probe_kvm
    salt-call nova_libvirt.virt_type
    salt '*' nova_libvirt.running_domains
    salt-call nova_libvirt.list_domains uri=qemu+tcp://192.0.2.10/system
"""

import copy
import errno
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import platform
import pwd
import re
import socket
import ssl
import stat
import subprocess
import tempfile
import time

import salt.utils.files
import salt.utils.yaml
from salt.exceptions import CommandExecutionError, SaltInvocationError

log = logging.getLogger(__name__)

__virtualname__ = "nova_libvirt"

DEFAULTS_URL = "salt://nova_libvirt/defaults.yaml"
PILLAR_ROOT = "nova_libvirt"
HIDDEN = "<hidden>"

# Kolla's fixed paths inside the nova_libvirt container (nova-libvirt.json.j2).
CONTAINER_CONFIG_DIR = "/var/lib/kolla/config_files"
TLS_FILES = ("cacert.pem", "servercert.pem", "serverkey.pem", "clientcert.pem", "clientkey.pem")
CLIENT_FILES = ("cacert.pem", "clientcert.pem", "clientkey.pem")


def pki_paths(pki_dir="/etc/pki"):
    """libvirt's default TLS file locations below ``pki_dir`` (kbase/tlscerts)."""
    return {
        "serverkey.pem": f"{pki_dir}/libvirt/private/serverkey.pem",
        "servercert.pem": f"{pki_dir}/libvirt/servercert.pem",
        "clientkey.pem": f"{pki_dir}/libvirt/private/clientkey.pem",
        "clientcert.pem": f"{pki_dir}/libvirt/clientcert.pem",
        "cacert.pem": f"{pki_dir}/CA/cacert.pem",
    }


PKI_FILES = pki_paths()
TCP_PORT, TLS_PORT = 16509, 16514

# <linux/kvm.h>: _IO(KVMIO, 0x00) and _IO(KVMIO, 0x01); the API version is 12
# on every kernel since 2.6.22.
KVM_GET_API_VERSION, KVM_CREATE_VM, KVM_API_VERSION = 0xAE00, 0xAE01, 12

SASL_MECHS = ("DIGEST-MD5", "SCRAM-SHA-256", "SCRAM-SHA-1", "GSSAPI", "PLAIN", "EXTERNAL")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def __virtual__():
    # No hard dependency: libvirt-python is imported by the functions that
    # need it, so settings and the probe work on a bare minion.
    return __virtualname__


# --------------------------------------------------------------------------
# Settings: merge, validate, derive
# --------------------------------------------------------------------------


def _expect(check, expected):
    def rule(value):
        return None if check(value) else expected

    return rule


def _optional(rule):
    return lambda value: None if value is None else rule(value)


def _one_of(*choices):
    return _expect(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def _is_bool(v):
    return isinstance(v, bool)


def _is_positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_ip(v):
    try:
        ipaddress.ip_address(v)
    except (TypeError, ValueError):
        return False
    return True


BOOL = _expect(_is_bool, "true or false")
POSITIVE_INT = _expect(_is_positive_int, "a whole number above 0")
ABS_PATH = _expect(lambda v: isinstance(v, str) and os.path.isabs(v) and "\n" not in v, "an absolute path")
NAME = _expect(lambda v: isinstance(v, str) and SAFE_NAME.match(v), "a name of letters, digits and . _ @ -")
SECRET = _expect(
    lambda v: isinstance(v, str) and v and "\n" not in v and v == v.strip(),
    "a non-empty string without newlines or leading/trailing blanks",
)
SOURCE = _expect(
    lambda v: isinstance(v, str) and (v.startswith("salt://") or os.path.isabs(v)),
    "a salt:// URL or an absolute path",
)
EXTRA = _expect(
    lambda v: isinstance(v, dict)
    and all(isinstance(k, str) and SAFE_NAME.match(k) and isinstance(x, (str, int, bool, list)) for k, x in v.items()),
    "a mapping of option names to strings, numbers, booleans or lists",
)

# Every key of defaults.yaml has a rule here; a key missing from this table
# is a programming error caught by the unit tests.
RULES = {
    "virt_type": _one_of("kvm", "qemu", "auto"),
    "config_dir": ABS_PATH,
    "migration_interface": _optional(NAME),
    "listen_address": _optional(_expect(_is_ip, "an IPv4 or IPv6 address")),
    "migration_hostname": _optional(_expect(lambda v: isinstance(v, str) and HOSTNAME.match(v), "a DNS host name")),
    "port": _optional(_expect(lambda v: _is_positive_int(v) and v < 65536, "a TCP port (1-65535)")),
    "cpu_mode": _optional(_one_of("none", "host-model", "host-passthrough", "custom")),
    "container:enabled": BOOL,
    "container:engine": _one_of("docker", "podman"),
    "container:engine_url": _optional(
        _expect(lambda v: isinstance(v, str) and re.match(r"^(unix|tcp|ssh|https?)://", v), "a unix:// or tcp:// URL")
    ),
    "container:name": NAME,
    "container:image": _expect(lambda v: isinstance(v, str) and re.match(r"^[a-z0-9][a-z0-9._/:-]*$", v), "an image name"),
    "container:tag": NAME,
    "container:volumes": _expect(
        lambda v: isinstance(v, dict) and all(SAFE_NAME.match(k) and isinstance(p, str) and os.path.isabs(p) for k, p in v.items()),
        "a mapping of volume names to absolute mount points",
    ),
    "container:extra_volumes": _expect(
        lambda v: isinstance(v, list) and all(isinstance(b, str) and b.count(":") in (1, 2) for b in v),
        'a list of "source:destination[:options]"',
    ),
    "container:qemu_gid": POSITIVE_INT,
    "container:run_dir": ABS_PATH,
    "container:ulimits": _expect(
        lambda v: isinstance(v, dict)
        and all(SAFE_NAME.match(k) and re.match(r"^\d+(:\d+)?$", str(x)) for k, x in v.items()),
        'a mapping of limit names to "soft:hard" numbers',
    ),
    "container:ready_timeout": POSITIVE_INT,
    "host:manage_daemon": BOOL,
    "host:libvirtd_conf": ABS_PATH,
    "host:sasl_conf": ABS_PATH,
    "host:service": _optional(NAME),
    "host:pki_dir": ABS_PATH,
    "sasl:enabled": BOOL,
    "sasl:authname": NAME,
    "sasl:password": _optional(SECRET),
    "sasl:mech_list": _optional(
        _expect(
            lambda v: isinstance(v, list) and v and all(m in SASL_MECHS for m in v),
            "a non-empty list of " + ", ".join(SASL_MECHS),
        )
    ),
    "sasl:sasldb_path": ABS_PATH,
    "tls:enabled": BOOL,
    "tls:manage_certs": BOOL,
    "tls:source": SOURCE,
    "tls:files": _expect(
        lambda v: isinstance(v, dict) and all(k in TLS_FILES and isinstance(x, str) and x for k, x in v.items()),
        "a mapping of " + ", ".join(TLS_FILES) + " to PEM text",
    ),
    "tls:warn_days": _expect(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a whole number >= 0"),
    "libvirtd:debug": BOOL,
    "libvirtd:log_dir": ABS_PATH,
    "libvirtd:max_workers": POSITIVE_INT,
    "libvirtd:max_client_requests": POSITIVE_INT,
    "libvirtd:extra": EXTRA,
    "qemu:user": NAME,
    "qemu:group": NAME,
    "qemu:max_files": POSITIVE_INT,
    "qemu:max_processes": POSITIVE_INT,
    "qemu:extra": EXTRA,
    "nova_compute:user": NAME,
    "cleanup:running_vms_fatal": BOOL,
    "cleanup:remove_volumes": BOOL,
    "cleanup:keep_domains": BOOL,
    "cleanup:host_uri": _expect(lambda v: isinstance(v, str) and "://" in v, "a libvirt URI"),
}
SECRET_KEYS = {"sasl:password", "tls:files"}


def _merge(defaults, overrides, path, errors):
    """Deep-merge ``overrides`` over ``defaults``; collect unknown keys."""
    merged = copy.deepcopy(defaults)
    for key, value in overrides.items():
        where = f"{path}:{key}" if path else str(key)
        if key not in defaults:
            errors.append(
                f"{PILLAR_ROOT}:{where}: unknown key; expected one of: {', '.join(sorted(map(str, defaults)))}"
            )
        elif where not in RULES and isinstance(defaults[key], dict) and isinstance(value, dict):
            merged[key] = _merge(defaults[key], value, where, errors)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _flatten(tree, path=""):
    for key, value in tree.items():
        where = f"{path}:{key}" if path else key
        if where not in RULES and isinstance(value, dict):
            yield from _flatten(value, where)
        else:
            yield where, value


def _get(tree, path):
    for part in path.split(":"):
        tree = tree[part]
    return tree


def _merge_and_validate(defaults, pillar):
    """
    Merge ``pillar`` over ``defaults`` and check every key against its rule.

    Returns ``(merged, errors)``; each error names the pillar key, the value
    (never a secret's) and what is expected. Pure: no Salt dunders, so it is
    unit-tested directly.
    """
    errors = []
    if not isinstance(pillar, dict):
        return copy.deepcopy(defaults), [f"{PILLAR_ROOT}: expected a mapping, got {type(pillar).__name__}"]
    merged = _merge(defaults, pillar, "", errors)
    for key, value in _flatten(merged):
        rule = RULES.get(key)
        if rule is None:
            raise KeyError(f"no validation rule for {key}")  # a defaults.yaml key without a rule
        problem = rule(value)
        if problem:
            shown = "(hidden)" if key in SECRET_KEYS else json.dumps(value, default=str)
            errors.append(f"{PILLAR_ROOT}:{key}: {shown} is not valid; expected {problem}")
    return merged, errors


def _url_host(address):
    return f"[{address}]" if ":" in address else address


def _conf_value(value):
    """libvirtd.conf/qemu.conf value syntax: numbers bare, strings quoted."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def _conf_lines(options):
    """``key = value`` lines of libvirtd.conf or qemu.conf from ``[(key, value)]``."""
    return [f"{key} = {_conf_value(value)}" for key, value in options]


def auth_conf_text(authname, password):
    """libvirt client credentials (auth.conf), as Kolla's auth.conf.j2 renders them."""
    return (
        "[credentials-default]\n"
        f"authname={authname}\n"
        f"password={password}\n"
        "\n"
        "[auth-libvirt-default]\n"
        "credentials=default\n"
    )


def _derive(merged, facts):
    """
    Fill in derived values and prepare what every file needs.

    ``facts`` holds what the host tells: ``nodename``, ``osarch``,
    ``interfaces`` ({name: [addresses]}), ``default_interface`` and ``kvm``
    (the result of :py:func:`probe_kvm`). Returns ``(settings, errors)``.
    """
    cfg = copy.deepcopy(merged)
    errors = []
    tls, sasl = cfg["tls"]["enabled"], cfg["sasl"]

    if cfg["port"] is None:
        cfg["port"] = TLS_PORT if tls else TCP_PORT
    if sasl["mech_list"] is None:
        sasl["mech_list"] = ["SCRAM-SHA-256" if tls else "DIGEST-MD5"]
    if sasl["enabled"] and sasl["password"] is None:
        errors.append(
            f"{PILLAR_ROOT}:sasl:password: missing; SASL is enabled, so nova-compute needs a password "
            "(set it, for example 40 random characters as kolla-genpwd makes, or set sasl:enabled: false)"
        )
    if cfg["migration_hostname"] is None:
        cfg["migration_hostname"] = facts["nodename"]
    if cfg["cpu_mode"] is None and facts.get("osarch") in ("aarch64", "arm64"):
        cfg["cpu_mode"] = "host-passthrough"

    if cfg["listen_address"] is None:
        iface = cfg["migration_interface"] or facts.get("default_interface")
        addresses = facts.get("interfaces", {}).get(iface or "", [])
        if not iface:
            errors.append(
                f"{PILLAR_ROOT}:listen_address: cannot be derived: no migration_interface is set and the host "
                "has no IPv4 default route; set listen_address or migration_interface"
            )
        elif not addresses:
            errors.append(
                f"{PILLAR_ROOT}:migration_interface: {json.dumps(iface)} has no IP address on this host; "
                f"expected one of: {', '.join(sorted(i for i, a in facts.get('interfaces', {}).items() if a)) or 'none'}"
            )
        else:
            cfg["listen_address"] = addresses[0]

    kvm = facts["kvm"]
    wanted = cfg["virt_type"]
    if wanted == "auto":
        cfg["virt_type"] = "kvm" if kvm["usable"] else "qemu"
        cfg["virt_type_reason"] = (
            "auto: KVM is usable" if kvm["usable"] else f"auto: falling back to qemu (TCG): {kvm['reason']}"
        )
    elif wanted == "kvm" and not kvm["usable"]:
        errors.append(
            f"{PILLAR_ROOT}:virt_type: \"kvm\" but KVM is not usable on this host: {kvm['reason']}. "
            "Fix the host, or set virt_type: qemu (software emulation) or auto"
        )
        cfg["virt_type_reason"] = kvm["reason"]
    else:
        cfg["virt_type_reason"] = f"{wanted}: set in pillar"

    if errors:
        return cfg, errors

    if tls:
        host_part = cfg["migration_hostname"]
        scheme, default_port = "qemu+tls", TLS_PORT
    else:
        host_part = _url_host(cfg["listen_address"])
        scheme, default_port = "qemu+tcp", TCP_PORT
    port_part = "" if cfg["port"] == default_port else f":{cfg['port']}"
    cfg["connection_uri"] = f"{scheme}://{host_part}{port_part}/system"
    inbound = cfg["migration_hostname"] if tls else cfg["listen_address"]

    libvirt_dir = os.path.join(cfg["config_dir"], "nova-libvirt")
    compute_dir = os.path.join(cfg["config_dir"], "nova-compute")
    cfg["paths"] = {
        "libvirt_dir": libvirt_dir,
        "compute_dir": compute_dir,
        "compute_auth_conf": os.path.join(compute_dir, "auth.conf"),
        "compute_nova_conf": os.path.join(compute_dir, "nova.conf.d", "libvirt.conf"),
        # libvirt's ?pkipath= wants cacert.pem, clientcert.pem and clientkey.pem
        # in one directory: nova-compute's config dir is exactly that.
        "client_pki_dir": compute_dir,
    }
    try:
        cfg["nova_compute"]["owner"] = pwd.getpwnam(cfg["nova_compute"]["user"]).pw_name
    except KeyError:
        cfg["nova_compute"]["owner"] = "root"

    auth = "sasl" if sasl["enabled"] else "none"
    level = 1 if cfg["libvirtd"]["debug"] else 3
    # Inside Kolla's container the files sit at libvirt's defaults; a host
    # daemon finds them below host:pki_dir.
    daemon_pki = pki_paths("/etc/pki" if cfg["container"]["enabled"] else cfg["host"]["pki_dir"])
    if tls:
        listeners = [
            ("listen_tls", 1),
            ("listen_tcp", 0),
            ("tls_port", str(cfg["port"])),
            ("key_file", daemon_pki["serverkey.pem"]),
            ("cert_file", daemon_pki["servercert.pem"]),
            ("ca_file", daemon_pki["cacert.pem"]),
            ("auth_tls", auth),
        ]
    else:
        listeners = [
            ("listen_tcp", 1),
            ("listen_tls", 0),
            ("auth_tcp", auth),
            ("tcp_port", str(cfg["port"])),
            ("ca_file", ""),
        ]
    libvirtd = listeners + [
        ("log_level", level),
        ("log_outputs", f"{level}:file:{cfg['libvirtd']['log_dir']}/libvirtd.log"),
        ("listen_addr", cfg["listen_address"]),
        ("max_workers", cfg["libvirtd"]["max_workers"]),
        ("max_client_requests", cfg["libvirtd"]["max_client_requests"]),
    ]
    qemu = [
        ("stdio_handler", "logd"),
        ("user", cfg["qemu"]["user"]),
        ("group", cfg["qemu"]["group"]),
        ("max_files", cfg["qemu"]["max_files"]),
        ("max_processes", cfg["qemu"]["max_processes"]),
    ]
    nova_libvirt = [("connection_uri", json.dumps(cfg["connection_uri"]))]
    if tls:
        nova_libvirt.append(("live_migration_scheme", '"tls"'))
    nova_libvirt += [("live_migration_inbound_addr", json.dumps(inbound)), ("virt_type", cfg["virt_type"])]
    if cfg["cpu_mode"]:
        nova_libvirt.append(("cpu_mode", cfg["cpu_mode"]))
    nova_libvirt.append(("num_pcie_ports", "16"))

    cfg["tls_plan"] = _tls_plan(cfg, daemon_pki) if tls else []
    cfg["container"].update(_container_spec(cfg, facts["nodename"]))
    cfg["render"] = {
        "libvirtd_conf": _conf_lines(_with_extra(libvirtd, cfg["libvirtd"]["extra"])),
        "qemu_conf": _conf_lines(_with_extra(qemu, cfg["qemu"]["extra"])),
        "sasl_conf": [f"mech_list: {' '.join(sasl['mech_list'])}", f"sasldb_path: {sasl['sasldb_path']}"],
        "nova_conf": {
            "libvirt": [f"{k} = {v}" for k, v in nova_libvirt],
            "workarounds": ["skip_cpu_compare_on_dest = true"],
        },
        "config_json": _kolla_config_json(cfg),
    }
    return cfg, []


def _tls_plan(cfg, daemon_pki):
    """
    Where each TLS file goes, as Kolla's config-libvirt-tls.yml: the container
    gets all five in its config dir, nova-compute the CA and the client pair;
    a host daemon managed by the formula gets all five below host:pki_dir.
    ``daemon`` marks the copies libvirtd itself reads (a change there is
    pushed to the running daemon).
    """
    compute = cfg["nova_compute"]["owner"]
    plan = [
        {"file": name, "dest": os.path.join(cfg["paths"]["compute_dir"], name), "owner": compute, "mode": "0600", "daemon": False}
        for name in CLIENT_FILES
    ]
    if cfg["container"]["enabled"]:
        plan += [
            {"file": name, "dest": os.path.join(cfg["paths"]["libvirt_dir"], name), "owner": "root", "mode": "0600", "daemon": True}
            for name in TLS_FILES
        ]
    elif cfg["host"]["manage_daemon"]:
        plan += [
            {"file": name, "dest": daemon_pki[name], "owner": "root", "mode": "0600" if name.endswith("key.pem") else "0644", "daemon": True}
            for name in TLS_FILES
        ]
    return plan


ENGINE_SOCKETS = {"docker": "unix:///var/run/docker.sock", "podman": "unix:///run/podman/podman.sock"}


def _container_spec(cfg, nodename):
    """Kolla's nova_libvirt container (nova_cell_services['nova-libvirt']) for these settings."""
    spec = cfg["container"]
    binds = [
        f"{cfg['paths']['libvirt_dir']}:/var/lib/kolla/config_files:ro",
        "/lib/modules:/lib/modules:ro",
        f"{spec['run_dir']}:/run:shared",
        "/dev:/dev",
        "/sys/fs/cgroup:/sys/fs/cgroup",
    ]
    binds += [f"{name}:{path}" for name, path in spec["volumes"].items()]
    binds += spec["extra_volumes"]
    return {
        "engine_url": spec["engine_url"] or ENGINE_SOCKETS[spec["engine"]],
        "image_ref": f"{spec['image']}:{spec['tag']}",
        "binds": binds,
        # HOME and HOSTNAME as the engine would add them (Podman records them
        # in the container's config): stated here, a second apply sees no
        # difference and does not recreate the container.
        "environment": {
            "KOLLA_CONFIG_STRATEGY": "COPY_ALWAYS",
            "KOLLA_SERVICE_NAME": "nova-libvirt",
            "HOME": "/root",
            "HOSTNAME": nodename,
        },
        "kvm_udev_rule": f'KERNEL=="kvm", GROUP="{spec["qemu_gid"]}", MODE="0660"',
        "ulimit_list": [f"{name}={limits}" for name, limits in spec["ulimits"].items()],
    }


def _with_extra(options, extra):
    """Kolla's options with the operator's ``extra`` ones: same key replaced in place, new keys appended."""
    keys = [k for k, _ in options]
    merged = [(k, extra.get(k, v)) for k, v in options]
    return merged + [(k, v) for k, v in extra.items() if k not in keys]


def _kolla_config_json(cfg):
    """Kolla's nova-libvirt config.json (kolla_set_configs) for these settings."""

    def entry(source, dest):
        return {"source": f"{CONTAINER_CONFIG_DIR}/{source}", "dest": dest, "owner": "root", "perm": "0600"}

    files = [entry("libvirtd.conf", "/etc/libvirt/libvirtd.conf"), entry("qemu.conf", "/etc/libvirt/qemu.conf")]
    if cfg["tls"]["enabled"]:
        files += [
            entry(name, PKI_FILES[name])
            for name in ("serverkey.pem", "servercert.pem", "clientkey.pem", "clientcert.pem", "cacert.pem")
        ]
    if cfg["sasl"]["enabled"]:
        files += [
            entry("sasl.conf", "/etc/sasl2/libvirt.conf"),
            entry("auth.conf", "/root/.config/libvirt/auth.conf"),
        ]
    return {"command": "/usr/local/bin/kolla_nova_libvirt_start", "config_files": files}


def _default_interface():
    try:
        routes = __salt__["network.default_route"]("inet")
    except (CommandExecutionError, KeyError):
        return None
    return routes[0]["interface"] if routes else None


def _host_facts(need_default_route=True):
    interfaces = {}
    for family in ("ip4_interfaces", "ip6_interfaces"):
        for iface, addresses in (__grains__.get(family) or {}).items():
            interfaces.setdefault(iface, []).extend(a for a in addresses if not a.startswith("fe80"))
    return {
        "nodename": __grains__.get("nodename") or platform.node(),
        "osarch": __grains__.get("osarch") or platform.machine(),
        "interfaces": interfaces,
        "default_interface": _default_interface() if need_default_route else None,
        "kvm": probe_kvm(),
    }


def _defaults():
    if "nova_libvirt.defaults" not in __context__:
        text = __salt__["cp.get_file_str"](DEFAULTS_URL)
        if not text:
            raise CommandExecutionError(
                f"{DEFAULTS_URL} cannot be read: is the formula on this minion's file_roots "
                "(and were its modules synced with saltutil.sync_all)?"
            )
        __context__["nova_libvirt.defaults"] = salt.utils.yaml.safe_load(text)
    return __context__["nova_libvirt.defaults"]


def _settings():
    pillar = __pillar__.get(PILLAR_ROOT, {}) or {}
    key = "nova_libvirt.settings." + hashlib.sha256(json.dumps(pillar, sort_keys=True, default=str).encode()).hexdigest()
    if key not in __context__:
        merged, errors = _merge_and_validate(_defaults(), pillar)
        if not errors:
            need_route = merged["listen_address"] is None and merged["migration_interface"] is None
            merged, errors = _derive(merged, _host_facts(need_route))
        if errors:
            raise SaltInvocationError("nova_libvirt pillar is not valid:\n  " + "\n  ".join(errors))
        __context__[key] = merged
    return __context__[key]


def settings(reveal_secrets=False):
    """
    The formula's settings for this minion: pillar ``nova_libvirt`` merged over
    the defaults, validated, with derived values and every file's lines.

    Raises ``SaltInvocationError`` listing every invalid key, so a state run
    that renders with it fails before touching anything.

    reveal_secrets
        Include the SASL password (state modules need it). Off by default, so
        the command line shows ``<hidden>``.

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.settings
    """
    cfg = copy.deepcopy(_settings())
    if not reveal_secrets:
        if cfg["sasl"]["password"] is not None:
            cfg["sasl"]["password"] = HIDDEN
        cfg["tls"]["files"] = {name: HIDDEN for name in cfg["tls"]["files"]}
    return cfg


# --------------------------------------------------------------------------
# KVM probe
# --------------------------------------------------------------------------


def _cpu_flags():
    try:
        with salt.utils.files.fopen("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _kvm_modules():
    try:
        with salt.utils.files.fopen("/proc/modules") as modules:
            return sorted(m.split()[0] for m in modules if m.split()[0] in ("kvm", "kvm_intel", "kvm_amd"))
    except OSError:
        return []


def _nested():
    for module in ("kvm_intel", "kvm_amd"):
        try:
            with salt.utils.files.fopen(f"/sys/module/{module}/parameters/nested") as param:
                return param.read().strip() in ("Y", "1")
        except OSError:
            continue
    return None


def probe_kvm(device="/dev/kvm"):
    """
    Probe whether KVM is usable here, the way QEMU uses it: open ``device``
    read-write, ``KVM_GET_API_VERSION`` must answer 12 and ``KVM_CREATE_VM``
    must succeed. CPU flags are reported, not trusted: inside a VM with nested
    KVM ``/proc/cpuinfo`` may show no ``vmx``/``svm`` while KVM works.

    Returns ``usable``, ``reason`` (one line when not usable), ``api_version``,
    ``cpu_flags`` (vmx/svm/hypervisor present), ``modules``, ``nested`` and the
    ``virtual`` grain.

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.probe_kvm
    """
    flags = _cpu_flags()
    result = {
        "device": device,
        "usable": False,
        "reason": "",
        "api_version": None,
        "cpu_flags": sorted(flags & {"vmx", "svm", "hypervisor"}),
        "modules": _kvm_modules(),
        "nested": _nested(),
        "virtual": __grains__.get("virtual", "unknown"),
    }
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            hint = (
                "load kvm_intel or kvm_amd"
                if not result["modules"]
                else "the kvm module is loaded but created no device"
            )
            if not flags & {"vmx", "svm"}:
                hint += "; the CPU shows no vmx/svm: enable virtualisation in the BIOS, or nested virtualisation on the hypervisor"
            result["reason"] = f"{device} does not exist ({hint})"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            result["reason"] = f"{device} is not readable and writable by uid {os.getuid()}: {exc.strerror}"
        else:
            result["reason"] = f"cannot open {device}: {exc.strerror}"
        return result
    try:
        try:
            result["api_version"] = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        except OSError as exc:
            result["reason"] = f"KVM_GET_API_VERSION failed on {device}: {exc.strerror}"
            return result
        if result["api_version"] != KVM_API_VERSION:
            result["reason"] = f"KVM API version {result['api_version']}, expected {KVM_API_VERSION}"
            return result
        try:
            vm_fd = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        except OSError as exc:
            result["reason"] = (
                f"KVM_CREATE_VM failed: {exc.strerror} (virtualisation disabled in the BIOS, "
                "or nested virtualisation off on the hypervisor)"
            )
            return result
        os.close(vm_fd)
    finally:
        os.close(fd)
    result["usable"] = True
    return result


def virt_type():
    """
    The virt type nova-compute uses on this host: ``kvm`` or ``qemu``, from
    pillar ``nova_libvirt:virt_type`` and the KVM probe (``auto`` picks kvm
    when the probe says it is usable).

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.virt_type
    """
    return _settings()["virt_type"]


# --------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------


def _import_libvirt():
    try:
        import libvirt  # pylint: disable=import-outside-toplevel
    except ImportError as exc:
        raise CommandExecutionError(
            "libvirt-python is not importable by Salt's Python: install it with "
            "`salt-pip install libvirt-python` (onedir) or `pip install libvirt-python` "
            "(needs libvirt-dev, pkg-config and gcc)"
        ) from exc
    return libvirt


def _explain(exc, uri):
    """An operator-facing message for a libvirt connection error."""
    text = str(exc)
    lowered = text.lower()
    if "connection refused" in lowered:
        hint = "nothing listens there: is libvirtd (or the nova_libvirt container) running with --listen?"
    elif "certificate" in lowered or "verify peer" in lowered or "tls" in lowered:
        hint = "TLS verification failed: check the CA, the client pair and that the server certificate names the host"
    elif "authentication failed" in lowered or "sasl" in lowered:
        hint = "SASL authentication failed: check nova_libvirt:sasl:authname/password and the sasldb user"
    elif "no route" in lowered or "timed out" in lowered or "name or service not known" in lowered:
        hint = "the host cannot be reached: check migration_hostname/listen_address"
    else:
        hint = "see libvirt's message"
    return f"cannot use libvirt at {uri}: {hint} ({text})"


def _connection_args(uri, authname, password, pkipath):
    """Fill what the caller left out from the formula's settings."""
    if uri is None or (authname is None and password is None and pkipath is None):
        cfg = _settings()
        if uri is None:
            uri = cfg["connection_uri"]
            if cfg["tls"]["enabled"] and pkipath is None:
                pkipath = cfg["paths"]["client_pki_dir"]
        if cfg["sasl"]["enabled"] and authname is None:
            authname, password = cfg["sasl"]["authname"], cfg["sasl"]["password"]
    if pkipath:
        uri += ("&" if "?" in uri else "?") + f"pkipath={pkipath}"
    return uri, authname, password


def _open(uri, authname=None, password=None):
    libvirt = _import_libvirt()

    def credentials(creds, _):
        for cred in creds:
            if cred[0] == libvirt.VIR_CRED_AUTHNAME:
                cred[4] = authname
            elif cred[0] == libvirt.VIR_CRED_PASSPHRASE:
                cred[4] = password
            else:
                return -1
        return 0

    try:
        if authname is None:
            return libvirt.open(uri)
        # libvirt.open() does not read auth.conf for SASL: credentials come
        # through the callback.
        auth = [[libvirt.VIR_CRED_AUTHNAME, libvirt.VIR_CRED_PASSPHRASE], credentials, None]
        return libvirt.openAuth(uri, auth, 0)
    except libvirt.libvirtError as exc:
        raise CommandExecutionError(_explain(exc, uri)) from None


STATE_NAMES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff", 6: "crashed", 7: "pmsuspended"}


def _domains(uri, authname, password, pkipath, active_only):
    uri, authname, password = _connection_args(uri, authname, password, pkipath)
    libvirt = _import_libvirt()
    conn = _open(uri, authname, password)
    try:
        flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE if active_only else 0
        # One RPC for the list and every state; name, UUID and id come with
        # each domain object, so no call per domain.
        stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE, flags)
    except libvirt.libvirtError as exc:
        raise CommandExecutionError(_explain(exc, uri)) from None
    finally:
        conn.close()
    domains = []
    for dom, record in stats:
        dom_id = dom.ID()
        domains.append(
            {
                "name": dom.name(),
                "uuid": dom.UUIDString(),
                "id": dom_id if dom_id >= 0 else None,
                "state": STATE_NAMES.get(record.get("state.state"), "unknown"),
                "active": dom_id >= 0,
            }
        )
    return sorted(domains, key=lambda d: d["name"])


def list_domains(uri=None, authname=None, password=None, pkipath=None):
    """
    Every domain of the libvirt nova-compute uses, with ``name``, ``uuid``,
    ``id`` (None when shut off), ``state`` and ``active``: one RPC for all.

    By default the connection is nova-compute's: ``connection_uri``, the SASL
    credentials and, with TLS, the client certificates in nova-compute's config
    dir. Any of them can be given instead.

    uri
        A libvirt URI, e.g. ``qemu+tcp://192.0.2.10/system``.
    authname, password
        SASL credentials. The password is never logged.
    pkipath
        Directory with ``cacert.pem``, ``clientcert.pem`` and ``clientkey.pem``.

    CLI Example:

    .. code-block:: bash

        salt '*' nova_libvirt.list_domains
        salt-call nova_libvirt.list_domains uri=qemu:///system
    """
    return _domains(uri, authname, password, pkipath, active_only=False)


def running_domains(uri=None, authname=None, password=None, pkipath=None):
    """
    The active domains only; same arguments as :py:func:`list_domains`.

    CLI Example:

    .. code-block:: bash

        salt '*' nova_libvirt.running_domains
    """
    return _domains(uri, authname, password, pkipath, active_only=True)


# --------------------------------------------------------------------------
# SASL database
# --------------------------------------------------------------------------


def _run(argv, stdin=None, env=None, binary=False):
    # subprocess directly, not cmd.run: the password goes on stdin and must
    # not reach cmd.run's logging of the call.
    try:
        proc = subprocess.run(
            argv, input=stdin, capture_output=True, text=not binary, check=False, env=env
        )
    except FileNotFoundError:
        raise CommandExecutionError(
            f"{argv[0]} is not installed (Debian: apt-get install sasl2-bin db5.3-util)"
        ) from None
    if proc.returncode:
        stderr = proc.stderr.decode(errors="replace") if binary else proc.stderr
        raise CommandExecutionError(f"{' '.join(argv)} failed ({proc.returncode}): {stderr.strip()}")
    return proc.stdout


def _in_container(container, argv):
    """``argv`` run inside ``container`` through the engine's CLI (``exec -i``: stdin reaches it)."""
    if not container:
        return argv
    cfg = _settings()
    return [cfg["container"]["engine"], "exec", "-i", container, *argv]


def _engine_env():
    cfg = _settings()
    env = dict(os.environ)
    if cfg["container"]["engine"] == "docker":
        env["DOCKER_HOST"] = cfg["container"]["engine_url"]
    return env


def _unescape_db_dump(line):
    """Bytes of one ``db_dump -p`` line: printable characters, ``\\\\`` and ``\\xx`` hex escapes."""
    out, i = bytearray(), 0
    while i < len(line):
        if line[i] == "\\":
            if line[i + 1] == "\\":
                out.append(0x5C)
                i += 2
            else:
                out.append(int(line[i + 1 : i + 3], 16))
                i += 3
        else:
            out.extend(line[i].encode())
            i += 1
    return bytes(out)


def _parse_db_dump(text):
    """
    ``{(user, realm): password}`` from ``db_dump -p`` of a Cyrus sasldb, whose
    keys are ``user\\0realm\\0property``.
    """
    body = text.split("HEADER=END\n", 1)[-1].split("DATA=END", 1)[0]
    lines = [line[1:] for line in body.splitlines() if line.startswith(" ")]
    entries = {}
    for key, value in zip(lines[0::2], lines[1::2]):
        parts = _unescape_db_dump(key).split(b"\0")
        if len(parts) == 3 and parts[2] == b"userPassword":
            entries[(parts[0].decode(), parts[1].decode())] = _unescape_db_dump(value).decode()
    return entries


def _sasldb_entries(sasldb, container=None):
    if not container:
        if not os.path.exists(sasldb):
            return {}
        return _parse_db_dump(_run(["db_dump", "-p", sasldb]))
    # The database lives in the container's writable layer. On this host the
    # container's root is /proc/<its pid>/root: read there, no exec needed.
    pid = _container_pid(container)
    if pid:
        path = f"/proc/{pid}/root{sasldb}"
        return _parse_db_dump(_run(["db_dump", "-p", path])) if os.path.exists(path) else {}
    # Otherwise read its bytes through the engine and dump them here, in a
    # file only root can read.
    probe = subprocess.run(_in_container(container, ["test", "-e", sasldb]), env=_engine_env(), check=False)
    if probe.returncode:
        return {}
    data = _run(_in_container(container, ["cat", sasldb]), env=_engine_env(), binary=True)
    with tempfile.NamedTemporaryFile(prefix="nova_libvirt-sasldb.") as copy_:
        os.fchmod(copy_.fileno(), 0o600)
        copy_.write(data)
        copy_.flush()
        return _parse_db_dump(_run(["db_dump", "-p", copy_.name]))


def sasl_users(sasldb=None, container=None):
    """
    The users in libvirt's SASL database, as ``user@realm``.

    sasldb
        Default: ``nova_libvirt:sasl:sasldb_path``.
    container
        Read the database inside this container (default: the nova_libvirt
        container when it is enabled, else the host's file).

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.sasl_users
    """
    cfg = _settings()
    sasldb = sasldb or cfg["sasl"]["sasldb_path"]
    if container is None and cfg["container"]["enabled"]:
        container = cfg["container"]["name"]
    return sorted(f"{user}@{realm}" for user, realm in _sasldb_entries(sasldb, container))


def sasl_user_diff(authname, password, sasldb, container=None):
    """
    What :py:func:`sasl_user_set` would change in ``sasldb``, without secrets:
    ``{"create": bool, "rotate": bool, "remove": ["user@realm", ...]}``.
    """
    entries = _sasldb_entries(sasldb, container)
    mine = {realm: pw for (user, realm), pw in entries.items() if user == authname}
    return {
        "create": not mine,
        "rotate": bool(mine) and any(pw != password for pw in mine.values()),
        "remove": sorted(f"{user}@{realm}" for user, realm in entries if user != authname),
    }


def sasl_user_set(authname, password, sasldb, container=None):
    """
    Make ``sasldb`` (inside ``container`` when given) hold ``authname`` with
    ``password`` and no other user. The password goes to ``saslpasswd2`` on
    stdin, never on a command line. Returns the change made, as
    :py:func:`sasl_user_diff`.
    """
    diff = sasl_user_diff(authname, password, sasldb, container)
    env = _engine_env() if container else None
    if not container:
        os.makedirs(os.path.dirname(sasldb), mode=0o755, exist_ok=True)
    if diff["create"] or diff["rotate"]:
        argv = ["saslpasswd2", "-c", "-p", "-a", "libvirt", "-f", sasldb, authname]
        _run(_in_container(container, argv), stdin=password, env=env)
    for user, realm in _sasldb_entries(sasldb, container):
        if user != authname:
            argv = ["saslpasswd2", "-d", "-a", "libvirt", "-f", sasldb, "-u", realm, user]
            _run(_in_container(container, argv), env=env)
    _run(_in_container(container, ["chmod", "0600", sasldb]), env=env)
    return diff


def metadata_changes(path, mode, uid=None, gid=None):
    """
    How ``path``'s mode (and owner, group, when given) differ from the wanted
    ones, as state changes: ``{"mode": {"old", "new"}, ...}``; ``None`` when
    ``path`` does not exist.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    changes = {}
    if stat.S_IMODE(st.st_mode) != mode:
        changes["mode"] = {"old": f"{stat.S_IMODE(st.st_mode):04o}", "new": f"{mode:04o}"}
    if uid is not None and st.st_uid != uid:
        changes["owner"] = {"old": st.st_uid, "new": uid}
    if gid is not None and st.st_gid != gid:
        changes["group"] = {"old": st.st_gid, "new": gid}
    return changes


def write_secret_file(path, text, owner="root", mode=0o600):
    """Write ``text`` (str or bytes) to ``path`` atomically, with ``mode`` set before any byte is written."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    account = pwd.getpwnam(owner)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".nova_libvirt.")
    try:
        os.fchmod(fd, mode)
        os.fchown(fd, account.pw_uid, account.pw_gid)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode() if isinstance(text, str) else text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------
# TLS reload
# --------------------------------------------------------------------------

def _served_certificate_sha256(address, port):
    """SHA-256 of the certificate libvirtd presents on its TLS port (not verified: only compared)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with socket.create_connection((address, port), timeout=10) as sock:
            with context.wrap_socket(sock) as tls:
                return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()
    except (OSError, ssl.SSLError):
        return None


def _installed_server_certificate_sha256(cfg):
    for entry in cfg["tls_plan"]:
        if entry["daemon"] and entry["file"] == "servercert.pem":
            try:
                with salt.utils.files.fopen(entry["dest"]) as handle:
                    pem = handle.read()
                first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
                return hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()
            except (OSError, ValueError):
                return None
    return None


def tls_status():
    """
    Whether the libvirtd this formula runs presents, on its TLS port, the
    server certificate installed for it: ``{"served", "installed",
    "current"}`` (SHA-256 of each; ``served`` is None when nothing answers).
    Works whoever put the files in place (``tls:manage_certs`` true or false).

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.tls_status
    """
    cfg = _settings()
    installed = _installed_server_certificate_sha256(cfg)
    served = _served_certificate_sha256(cfg["listen_address"], cfg["port"]) if installed else None
    return {"served": served, "installed": installed, "current": served is None or served == installed}


def reload_tls():
    """
    Make the running libvirtd use its new TLS certificate and key without a
    restart: ``virt-admin server-update-tls libvirtd`` (libvirt >= 6.2; in
    the container after ``kolla_set_configs`` copied the new files in), so
    running guests and open connections are not disturbed. Then check that the
    TLS port presents the installed certificate: server-update-tls re-reads
    libvirt's default ``/etc/pki`` paths, whatever libvirtd.conf says. Where
    that did not work, the host service is restarted (guests survive a
    libvirtd restart) when ``host:service`` is set; otherwise an error says a
    restart is needed.

    Returns what was done, or an empty string when no libvirtd runs (it reads
    the files when it starts).

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.reload_tls
    """
    cfg = _settings()
    expected = _installed_server_certificate_sha256(cfg)
    if _served_certificate_sha256(cfg["listen_address"], cfg["port"]) is None:
        return ""
    container = cfg["container"]["name"] if cfg["container"]["enabled"] else None
    env = _engine_env() if container else None
    try:
        if container:
            # kolla_set_configs copies the config dir into place, as at start.
            _run(_in_container(container, ["kolla_set_configs"]), env=env)
        _run(_in_container(container, ["virt-admin", "-c", "libvirtd:///system", "server-update-tls", "libvirtd"]), env=env)
        served = _served_certificate_sha256(cfg["listen_address"], cfg["port"])
        if expected and served != expected:
            raise CommandExecutionError(
                f"the TLS port {cfg['listen_address']}:{cfg['port']} still presents another certificate "
                "(server-update-tls reads libvirt's default /etc/pki paths)"
            )
    except CommandExecutionError as exc:
        if not cfg["container"]["enabled"] and cfg["host"]["service"]:
            __salt__["service.restart"](cfg["host"]["service"])
            return f"restarted {cfg['host']['service']}: {exc}"
        raise CommandExecutionError(f"libvirtd did not take the new TLS files ({exc}); restart it to use them") from None
    return "libvirtd reloaded its TLS files (virt-admin server-update-tls); its TLS port presents the new certificate"


# --------------------------------------------------------------------------
# The nova_libvirt container
# --------------------------------------------------------------------------


def _socket_answers(path):
    """A live socket, not a file left by a daemon that is gone (/run is shared with the container)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def salt_client_timeout():
    """saltext-dockermod's default API timeout, for the client handed to it."""
    try:
        import salt.utils.dockermod  # pylint: disable=import-outside-toplevel

        return salt.utils.dockermod.CLIENT_TIMEOUT
    except ImportError:
        return 60


def _docker_client(url):
    """
    One Engine API client per URL and run, shared with saltext-dockermod.
    It answers ``version()`` from the first answer: Podman takes about half a
    second for each, and the client, dockermod and the precheck all ask.
    """
    key = f"nova_libvirt.docker_client.{url}"
    if key not in __context__:
        try:
            import docker  # pylint: disable=import-outside-toplevel
        except ImportError:
            raise CommandExecutionError("the docker Python package is not importable by Salt's Python") from None

        class Client(docker.APIClient):
            _version_answer = None

            def version(self, api_version=True):
                if self._version_answer is None:
                    self._version_answer = super().version(api_version)
                return self._version_answer

        __context__[key] = Client(base_url=url, version="auto", timeout=salt_client_timeout())
    return __context__[key]


def _container_pid(name):
    """The host PID of the container's first process (0 when not running here, or unknown)."""
    spec = _settings()["container"]
    try:
        state = _docker_client(spec["engine_url"]).inspect_container(name)["State"]
    except Exception:  # pylint: disable=broad-except
        return 0
    pid = state.get("Pid") or 0
    return pid if state.get("Running") and os.path.exists(f"/proc/{pid}/root") else 0


def container_precheck(deploy=True):
    """
    Check, before any state runs, that the container engine answers at
    ``container:engine_url`` and, when deploying, that no host libvirtd holds
    libvirt's socket while the container is not there yet (Kolla's precheck).
    Points the saltext-dockermod states of this run at the same engine.

    deploy
        False for cleanup: a host libvirtd is then expected.

    Returns the engine's version.

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.container_precheck
    """
    cfg = _settings()
    spec = cfg["container"]
    url = spec["engine_url"]
    try:
        client = _docker_client(url)
        client.ping()
        version = client.version()
    except Exception as exc:  # pylint: disable=broad-except
        start = (
            "podman system service --time=0 unix:///run/podman/podman.sock"
            if spec["engine"] == "podman"
            else "dockerd (or systemctl start docker)"
        )
        raise CommandExecutionError(
            f"no {spec['engine']} engine answers at {url} (nova_libvirt:container:engine_url): {exc}. "
            f"Start it ({start}), set container:engine/engine_url, or set container:enabled: false "
            "to use a host libvirtd"
        ) from None
    configured = __opts__.get("docker.url")
    if configured and configured != url:
        raise CommandExecutionError(
            f"docker.url is {configured} in the minion config but nova_libvirt:container:engine_url is {url}: "
            "make them the same (the container states use docker.url)"
        )
    # saltext-dockermod keeps its client in the run's shared __context__ and
    # makes one from docker.url only when none is there: handing it this one
    # keeps a single setting, nova_libvirt:container:engine_url, for both.
    __context__["docker.client"] = client
    host_socket = os.path.join(spec["run_dir"], "libvirt", "libvirt-sock")
    existing = client.containers(all=True, filters={"name": f"^{spec['name']}$"})
    if deploy and not existing and _socket_answers(host_socket):
        raise CommandExecutionError(
            f"a host libvirtd answers on {host_socket} and the nova_libvirt container is not there "
            "yet: stop the host libvirtd, or set container:enabled: false to use it"
        )
    return {"engine": spec["engine"], "url": url, "version": version.get("Version")}


def container_info():
    """
    The nova_libvirt container as the engine sees it: ``id``, ``image``,
    ``state``, ``started_at``; ``None`` when there is none.

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.container_info
    """
    spec = _settings()["container"]
    client = _docker_client(spec["engine_url"])
    try:
        data = client.inspect_container(spec["name"])
    except Exception:  # pylint: disable=broad-except
        return None
    return {
        "id": data["Id"],
        "image": data["Config"]["Image"],
        "state": data["State"]["Status"],
        "started_at": data["State"].get("StartedAt"),
    }


def wait_ready(timeout=None):
    """
    Wait until libvirtd answers on ``listen_address:port`` (the address
    nova-compute connects to). Returns the seconds waited.

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.wait_ready timeout=60
    """
    cfg = _settings()
    timeout = timeout or cfg["container"]["ready_timeout"]
    start = time.monotonic()
    while True:
        try:
            with socket.create_connection((cfg["listen_address"], cfg["port"]), timeout=2):
                return round(time.monotonic() - start, 2)
        except OSError as exc:
            if time.monotonic() - start > timeout:
                raise CommandExecutionError(
                    f"libvirtd does not answer on {cfg['listen_address']}:{cfg['port']} after {timeout}s ({exc}): "
                    f"see `{cfg['container']['engine']} logs {cfg['container']['name']}` and "
                    f"{cfg['libvirtd']['log_dir']}/libvirtd.log"
                ) from None
            time.sleep(0.5)


# --------------------------------------------------------------------------
# Cleanup (Kolla's nova-libvirt-cleanup)
# --------------------------------------------------------------------------

# qemu-ga and qemu-img are not guests (Kolla's libvirt-cleanup.yml filter).
NOT_GUESTS = ("qemu-ga", "qemu-img")


def _guests_by_process_scan(container_id):
    guests = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with salt.utils.files.fopen(f"/proc/{pid}/comm") as handle:
                comm = handle.read().strip()
            if not comm.startswith("qemu") or comm.startswith(NOT_GUESTS):
                continue
            with salt.utils.files.fopen(f"/proc/{pid}/cgroup") as handle:
                cgroup = handle.read()
            with salt.utils.files.fopen(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        # With the host PID namespace every guest on the host is visible:
        # only those in the container's cgroup are its own.
        if container_id and container_id not in cgroup:
            continue
        name = next((a.decode()[len("guest="):].split(",")[0] for a in argv if a.startswith(b"guest=")), f"pid {pid}")
        guests.append(name)
    return sorted(guests)


def container_guests():
    """
    The guests running in the nova_libvirt container: asked of the
    container's libvirt first (``virsh list`` inside it), else found by a scan
    of the container's processes (``qemu*`` but qemu-ga and qemu-img).

    Returns ``{"container": bool, "running": [names], "method": str}``.

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.container_guests
    """
    info = container_info()
    if info is None:
        return {"container": False, "running": [], "method": "no container"}
    name = _settings()["container"]["name"]
    if info["state"] == "running":
        try:
            out = _run(_in_container(name, ["virsh", "-r", "-c", "qemu:///system", "list", "--name"]), env=_engine_env())
            return {"container": True, "running": sorted(filter(None, out.split())), "method": "libvirt API"}
        except CommandExecutionError as exc:
            log.info("nova_libvirt: the container's libvirt does not answer (%s): scanning processes", exc)
    return {"container": True, "running": _guests_by_process_scan(info["id"]), "method": "process scan"}


def container_domain_definitions():
    """
    The persistent guest definitions of the container's libvirt (the
    ``nova_libvirt_qemu`` volume), as ``{name: inactive XML}``.

    CLI Example:

    .. code-block:: bash

        salt-call nova_libvirt.container_domain_definitions
    """
    info = container_info()
    if info is None or info["state"] != "running":
        return {}
    name, env = _settings()["container"]["name"], _engine_env()
    virsh = ["virsh", "-c", "qemu:///system"]
    names = _run(_in_container(name, virsh + ["list", "--all", "--persistent", "--name"]), env=env).split()
    return {
        dom: _run(_in_container(name, virsh + ["dumpxml", "--inactive", "--security-info", dom]), env=env)
        for dom in names
    }


def define_domains(definitions, uri=None):
    """
    Define guests from ``{name: XML}`` in the libvirt at ``uri`` (default
    ``cleanup:host_uri``), skipping those already there. Returns the names
    defined.
    """
    libvirt = _import_libvirt()
    uri = uri or _settings()["cleanup"]["host_uri"]
    missing = missing_domains(definitions, uri)
    conn = _open(uri)
    try:
        for dom_name in missing:
            try:
                conn.defineXML(definitions[dom_name])
            except libvirt.libvirtError as exc:
                raise CommandExecutionError(f"cannot define {dom_name} in {uri}: {exc}") from None
    finally:
        conn.close()
    return missing


def missing_domains(definitions, uri=None):
    """The names of ``definitions`` not yet defined in the libvirt at ``uri``."""
    libvirt = _import_libvirt()
    uri = uri or _settings()["cleanup"]["host_uri"]
    conn = _open(uri)
    try:
        present = set(conn.listDefinedDomains()) | {conn.lookupByID(i).name() for i in conn.listDomainsID()}
    except libvirt.libvirtError as exc:
        raise CommandExecutionError(_explain(exc, uri)) from None
    finally:
        conn.close()
    return sorted(set(definitions) - present)
