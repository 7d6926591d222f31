"""
State module of the ``nova_libvirt`` formula: the two things that carry the
SASL password, so the password never passes through an SLS file, a state
argument, a diff, a command line or a log line.

.. code-block:: yaml

    nova_libvirt-host-sasl-user-present:
      nova_libvirt.sasl_user_present:
        - name: kolla
        - sasldb: /etc/libvirt/passwd.db

    nova_libvirt-config-compute-auth-conf-managed:
      nova_libvirt.auth_conf_managed:
        - name: /etc/kolla/nova-compute/auth.conf
        - owner: nova

Both take the password from ``nova_libvirt.settings(reveal_secrets=True)``
(pillar ``nova_libvirt:sasl:password``) and honour ``test=True``, reporting
what would change without the secret.
"""

import logging
import os
import pwd

import salt.utils.files
from salt.exceptions import CommandExecutionError, SaltInvocationError

log = logging.getLogger(__name__)

__virtualname__ = "nova_libvirt"


def __virtual__():
    if "nova_libvirt.settings" not in __salt__:
        return (False, "the nova_libvirt execution module is not loaded: run saltutil.sync_all")
    return __virtualname__


def _ret(name):
    return {"name": name, "changes": {}, "result": True, "comment": ""}


def _password():
    return __salt__["nova_libvirt.settings"](reveal_secrets=True)["sasl"]["password"]


def sasl_user_present(name, sasldb, container=None):
    """
    Make libvirt's SASL database ``sasldb`` hold the user ``name`` with the
    pillar's password, and no other user (the database is libvirt's alone, so
    an old authname goes when the authname changes).

    A right user changes nothing; a wrong password is rotated. The password is
    read from pillar and handed to ``saslpasswd2`` on stdin.

    name
        The SASL authname (``nova_libvirt:sasl:authname``).
    sasldb
        Path of the database (``nova_libvirt:sasl:sasldb_path``).
    container
        The database is inside this container (the ``nova_libvirt``
        container): read and written through the engine's ``exec``.
    """
    ret = _ret(name)
    try:
        password = _password()
        diff = __salt__["nova_libvirt.sasl_user_diff"](name, password, sasldb, container)
        changes = _sasl_changes(name, diff)
        if not changes:
            ret["comment"] = f"SASL user {name} is present in {sasldb} with the right password."
            return ret
        if __opts__["test"]:
            ret.update(result=None, changes=changes, comment=_sasl_comment(name, sasldb, changes, "would be"))
            return ret
        __salt__["nova_libvirt.sasl_user_set"](name, password, sasldb, container)
        after = _sasl_changes(name, __salt__["nova_libvirt.sasl_user_diff"](name, password, sasldb, container))
        if after:
            raise CommandExecutionError(f"{sasldb} still differs after saslpasswd2: {sorted(after)}")
        ret.update(changes=changes, comment=_sasl_comment(name, sasldb, changes, "was"))
    except (CommandExecutionError, SaltInvocationError) as exc:
        ret.update(result=False, changes={}, comment=str(exc))
    return ret


def _sasl_changes(name, diff):
    changes = {}
    if diff["create"]:
        changes["user"] = {"old": None, "new": name}
    elif diff["rotate"]:
        changes["password"] = "rotated"
    if diff["remove"]:
        changes["removed"] = diff["remove"]
    return changes


def _sasl_comment(name, sasldb, changes, verb):
    parts = []
    if "user" in changes:
        parts.append(f"SASL user {name} {verb} created in {sasldb}.")
    if "password" in changes:
        parts.append(f"The password of SASL user {name} {verb} rotated.")
    if "removed" in changes:
        parts.append(f"Other users {verb} removed: {', '.join(changes['removed'])}.")
    return " ".join(parts)


def auth_conf_managed(name, owner="root", mode="0600"):
    """
    Write libvirt client credentials (``auth.conf``: authname and password for
    every libvirt connection) to ``name``, owned by ``owner`` (root when that
    user does not exist) with ``mode``. Changes are reported without content.

    name
        Path, e.g. ``/etc/kolla/nova-compute/auth.conf``.
    owner
        File owner, e.g. ``nova``.
    mode
        Octal mode string; at most ``0600`` makes sense for a password file.
    """
    ret = _ret(name)
    try:
        cfg = __salt__["nova_libvirt.settings"](reveal_secrets=True)
        text = __salt__["nova_libvirt.auth_conf_text"](cfg["sasl"]["authname"], cfg["sasl"]["password"])
        try:
            account = pwd.getpwnam(owner)
        except KeyError:
            account = pwd.getpwnam("root")
        wanted_mode = int(str(mode), 8)
        changes = __salt__["nova_libvirt.metadata_changes"](name, wanted_mode, account.pw_uid, account.pw_gid)
        if changes is None:
            changes = {"file": "created"}
        else:
            with salt.utils.files.fopen(name) as handle:
                if handle.read() != text:
                    changes["content"] = "updated (not shown: it holds the SASL password)"
        if not changes:
            ret["comment"] = f"{name} is in the correct state."
            return ret
        if __opts__["test"]:
            ret.update(result=None, changes=changes, comment=f"{name} would be written.")
            return ret
        __salt__["nova_libvirt.write_secret_file"](name, text, owner=account.pw_name, mode=wanted_mode)
        ret.update(changes=changes, comment=f"{name} was written.")
    except (CommandExecutionError, SaltInvocationError, OSError) as exc:
        ret.update(result=False, changes={}, comment=str(exc))
    return ret


def libvirtd_ready(name, timeout=None):
    """
    Wait until libvirtd answers at ``name`` (``address:port``, for the
    comment) after a container (re)start; no change is ever reported.

    name
        What is waited for, e.g. ``127.0.0.1:16509``.
    timeout
        Seconds (``nova_libvirt:container:ready_timeout``).
    """
    ret = _ret(name)
    try:
        waited = __salt__["nova_libvirt.wait_ready"](timeout)
        ret["comment"] = f"libvirtd answers at {name}" + (f" (after {waited}s)." if waited >= 0.5 else ".")
    except CommandExecutionError as exc:
        # In test mode the container may not have been started yet.
        ret.update(result=None if __opts__["test"] else False, comment=str(exc))
    return ret


def device_accessible(name, gid, mode="0660"):
    """
    Give the device ``name`` (``/dev/kvm``) the group ``gid`` and ``mode`` now,
    as Kolla's udev rule does at the next event: QEMU in the container runs
    with the image's qemu group, which must open it.

    name
        Device path.
    gid
        Numeric group ID (Kolla's qemu group: 42427).
    mode
        Octal mode string.
    """
    ret = _ret(name)
    wanted = int(str(mode), 8)
    changes = __salt__["nova_libvirt.metadata_changes"](name, wanted, gid=int(gid))
    if changes is None:
        ret.update(result=False, comment=f"{name} does not exist.")
        return ret
    if not changes:
        ret["comment"] = f"{name} is accessible to group {gid}."
        return ret
    if __opts__["test"]:
        ret.update(result=None, changes=changes, comment=f"{name} would be given group {gid}, mode {mode}.")
        return ret
    os.chown(name, -1, int(gid))
    os.chmod(name, wanted)
    ret.update(changes=changes, comment=f"{name} now has group {gid}, mode {mode}.")
    return ret


def guests_absent(name, fatal=True):
    """
    Refuse to go on while guests run in the nova_libvirt container ``name``
    (Kolla's cleanup check); with ``fatal: false`` only report them.

    name
        The container's name.
    fatal
        ``nova_libvirt:cleanup:running_vms_fatal``.
    """
    ret = _ret(name)
    try:
        found = __salt__["nova_libvirt.container_guests"]()
    except CommandExecutionError as exc:
        ret.update(result=False, comment=str(exc))
        return ret
    if not found["container"]:
        ret["comment"] = f"There is no {name} container."
    elif not found["running"]:
        ret["comment"] = f"No guests run in {name} (asked by {found['method']})."
    elif fatal:
        ret.update(
            result=False,
            comment=f"Refusing to remove {name} with running guests: {', '.join(found['running'])} "
            f"(found by {found['method']}). Migrate them away, or set nova_libvirt:cleanup:running_vms_fatal: false.",
        )
    else:
        ret["comment"] = (
            f"Guests running in {name}: {', '.join(found['running'])}; going on (running_vms_fatal: false): "
            "they stop with the container."
        )
    return ret


def domains_kept(name, uri):
    """
    Define the persistent guests of the nova_libvirt container in the host
    libvirtd at ``uri`` before the container goes, so stopped guests survive
    the move to host libvirt.

    name
        The container's name.
    uri
        The host libvirtd (``nova_libvirt:cleanup:host_uri``).
    """
    ret = _ret(name)
    try:
        definitions = __salt__["nova_libvirt.container_domain_definitions"]()
        missing = __salt__["nova_libvirt.missing_domains"](definitions, uri) if definitions else []
        if not missing:
            ret["comment"] = f"Every guest definition of {name} is in {uri}." if definitions else f"{name} defines no guests."
            return ret
        changes = {"defined": missing}
        if __opts__["test"]:
            ret.update(result=None, changes=changes, comment=f"Would define in {uri}: {', '.join(missing)}.")
            return ret
        defined = __salt__["nova_libvirt.define_domains"](definitions, uri)
        ret.update(changes={"defined": defined}, comment=f"Defined in {uri}: {', '.join(defined)}.")
    except CommandExecutionError as exc:
        ret.update(result=False, changes={}, comment=str(exc))
    return ret
