# -*- coding: utf-8 -*-
# vim: ft=sls
#
# Kolla's nova-libvirt-cleanup on one host, after the operator disabled the
# container (container:enabled: false) and moved the guests away: refuse
# while it is enabled or guests run in it, optionally move the guest
# definitions to the host libvirtd, remove the container, its volumes (only
# with cleanup:remove_volumes), its config dir and the kvm fix-ups.
# Run it across hosts with the orchestration nova_libvirt.orch.cleanup.
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import config with context %}
{%- set ctr = config.container %}
{%- if ctr.enabled %}

nova_libvirt-clean-container-enabled-refused:
  test.fail_without_changes:
    - name: {{ ctr.name }}
    - comment: >-
        The nova_libvirt container has not been cleaned up because it is
        enabled. It may be disabled by setting nova_libvirt:container:enabled
        to false.
{%- else %}
{%-   do salt["nova_libvirt.container_precheck"](deploy=False) %}

nova_libvirt-clean-guests-absent:
  nova_libvirt.guests_absent:
    - name: {{ ctr.name }}
    - fatal: {{ config.cleanup.running_vms_fatal }}
{%-   if config.cleanup.keep_domains %}

nova_libvirt-clean-domains-kept:
  nova_libvirt.domains_kept:
    - name: {{ ctr.name }}
    - uri: {{ config.cleanup.host_uri }}
    - require:
      - nova_libvirt: nova_libvirt-clean-guests-absent
    - require_in:
      - docker_container: nova_libvirt-clean-container-absent
{%-   endif %}

nova_libvirt-clean-container-absent:
  docker_container.absent:
    - name: {{ ctr.name }}
    - force: true
    - require:
      - nova_libvirt: nova_libvirt-clean-guests-absent
{%-   if config.cleanup.remove_volumes %}
{%-     for volume in ctr.volumes %}

nova_libvirt-clean-{{ volume | replace("_", "-") }}-volume-absent:
  docker_volume.absent:
    - name: {{ volume }}
    - require:
      - docker_container: nova_libvirt-clean-container-absent
{%-     endfor %}
{%-   endif %}

nova_libvirt-clean-config-dir-file-absent:
  file.absent:
    - name: {{ config.paths.libvirt_dir }}
    - require:
      - docker_container: nova_libvirt-clean-container-absent
{%-   if config.virt_type == "kvm" %}

nova_libvirt-clean-kvm-udev-rule-file-absent:
  file.absent:
    - name: /etc/udev/rules.d/99-kolla-kvm.rules
    - require:
      - docker_container: nova_libvirt-clean-container-absent

nova_libvirt-clean-kvm-device-accessible:
  nova_libvirt.device_accessible:
    - name: /dev/kvm
    - gid: {{ salt["file.group_to_gid"]("kvm") or 0 }}
    - require:
      - docker_container: nova_libvirt-clean-container-absent
{%-   endif %}
{%- endif %}
