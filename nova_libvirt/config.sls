# -*- coding: utf-8 -*-
# vim: ft=sls
#
# Kolla's genconfig: every file into config_dir, no daemon, container or
# sasldb touched. nova-libvirt's files only while the container is enabled.
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import config with context %}
{%- set paths = config.paths %}

include:
  - {{ tplroot }}.tls
{%- set render = config.render %}
{%- set conf_files = [] %}
{%- if config.container.enabled %}
{%-   do conf_files.append(("libvirtd.conf", render.libvirtd_conf)) %}
{%-   do conf_files.append(("qemu.conf", render.qemu_conf)) %}
{%-   if config.sasl.enabled %}
{%-     do conf_files.append(("sasl.conf", render.sasl_conf)) %}
{%-   endif %}
{%- endif %}

{%- for file, lines in conf_files %}

nova_libvirt-config-{{ file | replace(".", "-") }}-file-managed:
  file.managed:
    - name: {{ paths.libvirt_dir }}/{{ file }}
    - source: salt://{{ tplroot }}/files/default/lines.conf.jinja
    - template: jinja
    - context:
        lines: {{ lines | json }}
    - user: root
    - group: root
    - mode: "0600"
    - dir_mode: "0750"
    - makedirs: true
{%- endfor %}

{%- if config.container.enabled %}

nova_libvirt-config-config-json-file-serialize:
  file.serialize:
    - name: {{ paths.libvirt_dir }}/config.json
    - dataset: {{ render.config_json | json }}
    - serializer: json
    - serializer_opts:
      - indent: 4
      - sort_keys: false
    - user: root
    - group: root
    - mode: "0600"
    - dir_mode: "0750"
    - makedirs: true
{%-   if config.sasl.enabled %}

nova_libvirt-config-libvirt-auth-conf-managed:
  nova_libvirt.auth_conf_managed:
    - name: {{ paths.libvirt_dir }}/auth.conf
    - owner: root
{%-   endif %}
{%- endif %}
{%- if config.sasl.enabled %}

nova_libvirt-config-compute-auth-conf-managed:
  nova_libvirt.auth_conf_managed:
    - name: {{ paths.compute_auth_conf }}
    - owner: {{ config.nova_compute.owner }}
{%- endif %}

nova_libvirt-config-compute-nova-conf-file-managed:
  file.managed:
    - name: {{ paths.compute_nova_conf }}
    - source: salt://{{ tplroot }}/files/default/ini.conf.jinja
    - template: jinja
    - context:
        sections: {{ render.nova_conf | json }}
    - user: root
    - group: {{ config.nova_compute.owner }}
    - mode: "0640"
    - dir_mode: "0750"
    - makedirs: true
