"""
Shared fixtures: the formula as a Salt state tree, a masterless minion that
applies it with a given pillar, and a real host libvirtd started from the
files the formula rendered.
"""

import importlib.util
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest
import salt.utils.yaml
from saltfactories.utils import random_string

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORMULA_DIRS = ("nova_libvirt", "_modules", "_states", "_runners")
PASSWORD = "Zx9-correct-horse-battery-staple-0123456789"


def load_module(kind, name):
    """Import ``_<kind>/<name>.py`` under a unique name (modules and states share basenames)."""
    spec = importlib.util.spec_from_file_location(f"formula_{kind}_{name}", ROOT / f"_{kind}" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def salt_factories_config():
    # Short daemon paths: AF_UNIX socket paths are limited to 108 bytes.
    return {"code_dir": str(ROOT), "inject_sitecustomize": False, "start_timeout": 120}


def pytest_sessionfinish(session):
    # Salt's deferred console handler replays the daemons' log records at
    # exit, after pytest closed the stream: drop them (pytest showed them).
    for handler in list(logging.root.handlers):
        queued = getattr(handler, "_DeferredStreamHandler__messages", None)
        if queued is not None:
            queued.clear()
        logging.root.removeHandler(handler)


def copy_formula(dest):
    """The formula's Salt parts, as they sit at the root of a file_roots entry."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in FORMULA_DIRS:
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, dest / name, dirs_exist_ok=True)
    return dest


@pytest.fixture(scope="session")
def state_tree(tmp_path_factory):
    return copy_formula(tmp_path_factory.mktemp("state-tree"))


@pytest.fixture(scope="session")
def kolla_image():
    """Podman's Docker API running, and the offline Kolla-compatible nova-libvirt image (cached)."""
    subprocess.run([str(ROOT / "test" / "image" / "podman-setup.sh")], check=True)
    built = subprocess.run([str(ROOT / "test" / "image" / "build-image.sh")], check=True, capture_output=True, text=True)
    return built.stdout.strip().splitlines()[-1]


def remove_container(engine, name, volumes):
    """Remove a test container and its volumes, whatever state the test left them in."""
    import docker  # pylint: disable=import-outside-toplevel

    try:
        engine.remove_container(name, force=True)
    except docker.errors.NotFound:
        pass
    for volume in volumes:
        try:
            engine.remove_volume(volume)
        except docker.errors.NotFound:
            pass


def restore_kvm_device():
    """Undo the container's kvm fix-ups on this test host."""
    subprocess.run(["chgrp", "kvm", "/dev/kvm"], check=False)
    if os.path.exists("/etc/udev/rules.d/99-kolla-kvm.rules"):
        os.unlink("/etc/udev/rules.d/99-kolla-kvm.rules")


class Masterless:
    """``salt-call --local`` with a pillar written as a real pillar file."""

    def __init__(self, minion, pillar_dir):
        self.minion = minion
        self.cli = minion.salt_call_cli(timeout=180)
        self.pillar_file = pillar_dir / "nova.sls"
        (pillar_dir / "top.sls").write_text("base:\n  '*':\n    - nova\n")

    def set_pillar(self, pillar):
        self.pillar_file.write_text(salt.utils.yaml.safe_dump({"nova_libvirt": pillar}, default_flow_style=False))

    def run(self, *args, pillar=None):
        if pillar is not None:
            self.set_pillar(pillar)
        return self.cli.run("--local", *args)

    def apply(self, sls="nova_libvirt", pillar=None, test=False):
        args = ["state.apply", sls] + (["test=True"] if test else [])
        return self.run(*args, pillar=pillar)


@pytest.fixture(scope="session")
def masterless(salt_factories, state_tree, tmp_path_factory):
    pillar_dir = tmp_path_factory.mktemp("pillar")
    minion = salt_factories.salt_minion_daemon(
        random_string("local-"),
        overrides={
            "file_client": "local",
            "file_roots": {"base": [str(state_tree)]},
            "pillar_roots": {"base": [str(pillar_dir)]},
        },
    )
    runner = Masterless(minion, pillar_dir)
    ret = runner.run("saltutil.sync_all", pillar={})
    assert ret.returncode == 0, ret.stderr
    return runner


class Fleet:
    """A real salt-master and minions on 127.0.0.1, each minion with its own ``nova_libvirt`` pillar."""

    def __init__(self, salt_factories, state_tree, base, pillars, extra_file_roots=()):
        self.base, self.pillars = base, pillars
        self.ids = {key: random_string(f"cmp-{key}-") for key in pillars}
        self.pillar_root = base / "pillar"
        self.pillar_root.mkdir(parents=True, exist_ok=True)
        self.write_pillar()
        self.master = salt_factories.salt_master_daemon(
            random_string("master-"),
            overrides={
                "file_roots": {"base": [str(state_tree), *map(str, extra_file_roots)]},
                "pillar_roots": {"base": [str(self.pillar_root)]},
                "interface": "127.0.0.1",
            },
        )
        self.minions = {}

    def write_pillar(self):
        top = {"base": {self.ids[key]: [f"compute_{key}"] for key in self.ids}}
        (self.pillar_root / "top.sls").write_text(salt.utils.yaml.safe_dump(top))
        for key, pillar in self.pillars.items():
            (self.pillar_root / f"compute_{key}.sls").write_text(salt.utils.yaml.safe_dump({"nova_libvirt": pillar}))

    def __enter__(self):
        self.master.start()
        for key, minion_id in self.ids.items():
            self.minions[key] = self.master.salt_minion_daemon(minion_id)
            self.minions[key].start()
        self.cli = self.master.salt_cli(timeout=240)
        self.run = self.master.salt_run_cli(timeout=300)
        assert self.cli.run("saltutil.sync_all", minion_tgt="cmp-*").returncode == 0
        assert self.run.run("saltutil.sync_all").returncode == 0
        return self

    def __exit__(self, *exc):
        for minion in self.minions.values():
            minion.terminate()
        self.master.terminate()

    def apply(self, key, sls="nova_libvirt", test=False):
        self.write_pillar()
        self.cli.run("saltutil.refresh_pillar", "wait=True", minion_tgt=self.ids[key])
        return self.cli.run("state.apply", sls, *(["test=True"] if test else []), minion_tgt=self.ids[key])

    def call(self, key, *args):
        return self.cli.run(*args, minion_tgt=self.ids[key])


def minion_states(ret):
    """State results of one minion's state.apply through the master, keyed by state ID."""
    assert isinstance(ret.data, dict), f"no state data: {ret.stdout}\n{ret.stderr}"
    return {key.split("_|-")[1]: value for key, value in ret.data.items()}


def with_overrides(pillar, overrides):
    """``pillar`` with ``overrides`` merged one level deep (a section's other keys are kept)."""
    for key, value in overrides.items():
        pillar[key] = {**pillar.get(key, {}), **value} if isinstance(value, dict) else value
    return pillar


def states(ret):
    """State results of a state.apply, keyed by state ID."""
    assert isinstance(ret.data, dict), f"no state data: {ret.stdout}\n{ret.stderr}"
    return {key.split("_|-")[1]: value for key, value in ret.data.items()}


def changed(ret):
    return {sid: st["changes"] for sid, st in states(ret).items() if st["changes"]}


def tree_snapshot(path):
    """Every file under ``path`` with its bytes, mode and mtime: to prove nothing was touched."""
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def socket_answers(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


class Libvirtd:
    """A real libvirtd (and virtlogd) on this host, started the way Kolla's image does: ``--listen``."""

    def __init__(self, conf, sasl_conf_dir, workdir, pki_dir=None, listen=True):
        self.conf, self.sasl_conf_dir, self.workdir = conf, sasl_conf_dir, pathlib.Path(workdir)
        # virt-admin server-update-tls re-reads libvirt's default /etc/pki only:
        # give this daemon a private mount namespace where /etc/pki is pki_dir.
        self.pki_dir = pki_dir
        self.listen = listen
        self.pidfile = self.workdir / "libvirtd.pid"
        self.proc = None
        self.started_virtlogd = False

    def start(self, timeout=30):
        probe = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True)
        assert probe.returncode != 0, "another libvirtd is running on this host"
        if not socket_answers("/run/libvirt/virtlogd-sock"):
            # A removed container can leave its virtlogd's socket in the shared /run.
            subprocess.run(["virtlogd", "-d"], check=True)
            self.started_virtlogd = True
        env = dict(os.environ)
        if self.sasl_conf_dir:
            # Cyrus SASL reads libvirt.conf from here instead of /etc/sasl2.
            env["SASL_CONF_PATH"] = str(self.sasl_conf_dir)
        log = open(self.workdir / "libvirtd.stderr", "ab")  # noqa: SIM115 - closed in stop()
        argv = ["libvirtd", "-f", str(self.conf), "-p", str(self.pidfile)] + (["--listen"] if self.listen else [])
        if self.pki_dir:
            os.makedirs("/etc/pki", exist_ok=True)
            argv = ["unshare", "-m", "sh", "-c", f'mount --bind "{self.pki_dir}" /etc/pki && exec "$@"', "sh", *argv]
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=log,
        )
        self._log = log
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited {self.proc.returncode}: {self.stderr()}")
            probe = subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True)
            if probe.returncode == 0:
                return self
            time.sleep(0.2)
        raise RuntimeError(f"libvirtd did not answer within {timeout}s: {self.stderr()}")

    def log(self):
        """libvirtd's own log (log_outputs of the rendered libvirtd.conf) and its stderr."""
        text = self.stderr()
        for path in self.workdir.rglob("libvirtd.log"):
            text += path.read_text(errors="replace")
        return text

    def stderr(self):
        return (self.workdir / "libvirtd.stderr").read_text(errors="replace")[-2000:]

    def virsh(self, *args, check=True, **kwargs):
        ret = subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=False, **kwargs)
        if check and ret.returncode:
            raise AssertionError(f"virsh {' '.join(args)} failed: {ret.stderr}\n{self.stderr()}")
        return ret

    def stop(self):
        if self.proc and self.proc.poll() is None:
            for dom in self.virsh("list", "--name", "--all", check=False).stdout.split():
                self.virsh("destroy", dom, check=False)
                self.virsh("undefine", dom, check=False)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._log.close()
        if self.started_virtlogd:
            # The container's libvirtd would otherwise use this host virtlogd.
            subprocess.run(["pkill", "-F", "/run/virtlogd.pid"], check=False)


def domain_xml(name, virt_type="kvm", memory_mib=64):
    """A guest with no disk: enough for QEMU to run it (KVM or TCG) and libvirt to list it."""
    return f"""<domain type='{virt_type}'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices>
</domain>"""


def as_json(obj):
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
