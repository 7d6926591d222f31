# -*- coding: utf-8 -*-
# vim: ft=sls
#
# Kolla's nova_libvirt container: the engine is checked while this file
# renders (nothing runs if it does not answer), then the kvm fix-ups, the
# volumes, the container (recreated when a rendered file changes), a wait
# for libvirtd, and the SASL user in its sasldb.
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import config with context %}
{%- set ctr = config.container %}
{%- do salt["nova_libvirt.container_precheck"]() %}
{%- set watched = ["libvirtd-conf", "qemu-conf"] + (["sasl-conf"] if config.sasl.enabled else []) %}

include:
  - {{ tplroot }}.config
{%- if config.virt_type == "kvm" %}

nova_libvirt-container-kvm-udev-rule-file-managed:
  file.managed:
    - name: /etc/udev/rules.d/99-kolla-kvm.rules
    - contents: |
        # Managed by Salt (nova_libvirt formula): /dev/kvm for the container's qemu group.
        {{ ctr.kvm_udev_rule }}
    - mode: "0644"
    - makedirs: true

# udev applies the rule at the next event; the container needs it now.
nova_libvirt-container-kvm-device-accessible:
  nova_libvirt.device_accessible:
    - name: /dev/kvm
    - gid: {{ ctr.qemu_gid }}
    - require_in:
      - docker_container: nova_libvirt-container-running
{%- endif %}

nova_libvirt-container-lib-modules-file-directory:
  file.directory:
    - name: /lib/modules
{%- for volume in ctr.volumes %}

nova_libvirt-container-{{ volume | replace("_", "-") }}-volume-present:
  docker_volume.present:
    - name: {{ volume }}
    - require_in:
      - docker_container: nova_libvirt-container-running
{%- endfor %}

nova_libvirt-container-image-present:
  docker_image.present:
    - name: {{ ctr.image_ref }}

nova_libvirt-container-running:
  docker_container.running:
    - name: {{ ctr.name }}
    - image: {{ ctr.image_ref }}
    - privileged: true
    - network_mode: host
    - pid_mode: host
    - binds: {{ ctr.binds | json }}
    - environment: {{ ctr.environment | json }}
    - restart_policy: unless-stopped
{%- if ctr.ulimit_list %}
    - ulimits: {{ ctr.ulimit_list | json }}
{%- endif %}
    - require:
      - docker_image: nova_libvirt-container-image-present
      - file: nova_libvirt-container-lib-modules-file-directory
    - watch:
{%- for id in watched %}
      - file: nova_libvirt-config-{{ id }}-file-managed
{%- endfor %}
      - file: nova_libvirt-config-config-json-file-serialize
{%- if config.sasl.enabled %}
      - nova_libvirt: nova_libvirt-config-libvirt-auth-conf-managed
{%- endif %}

nova_libvirt-container-libvirtd-ready:
  nova_libvirt.libvirtd_ready:
    - name: {{ config.listen_address }}:{{ config.port }}
    - timeout: {{ ctr.ready_timeout }}
    - require:
      - docker_container: nova_libvirt-container-running
{%- if config.sasl.enabled %}

# The sasldb lives in the container's writable layer: checked on every run,
# made again after a recreate, before nova-compute's credentials are done.
nova_libvirt-container-sasl-user-present:
  nova_libvirt.sasl_user_present:
    - name: {{ config.sasl.authname }}
    - sasldb: {{ config.sasl.sasldb_path }}
    - container: {{ ctr.name }}
    - require:
      - nova_libvirt: nova_libvirt-container-libvirtd-ready
    - require_in:
      - nova_libvirt: nova_libvirt-config-compute-auth-conf-managed
{%- endif %}
