# -*- coding: utf-8 -*-
# vim: ft=sls
#
# Beyond Kolla, opt-in (host:manage_daemon): the host libvirtd's own config
# and SASL user. libvirtd reads libvirtd.conf and the SASL config only when
# it starts, so a change restarts the service (guests keep running).
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import config with context %}
{%- set host_files = [(config.host.libvirtd_conf, config.render.libvirtd_conf)] %}
{%- if config.sasl.enabled %}
{%-   do host_files.append((config.host.sasl_conf, config.render.sasl_conf)) %}
{%- endif %}

{%- for path, lines in host_files %}

nova_libvirt-host-{{ path | replace("/", "-") | replace(".", "-") | trim("-") }}-file-managed:
  file.managed:
    - name: {{ path }}
    - source: salt://{{ tplroot }}/files/default/lines.conf.jinja
    - template: jinja
    - context:
        lines: {{ lines | json }}
    - user: root
    - group: root
    - mode: "0600"
    - makedirs: true
{%- endfor %}

nova_libvirt-host-log-dir-file-directory:
  file.directory:
    - name: {{ config.libvirtd.log_dir }}
    - user: root
    - group: root
    - mode: "0750"
    - makedirs: true
{%- if config.sasl.enabled %}

nova_libvirt-host-sasl-user-present:
  nova_libvirt.sasl_user_present:
    - name: {{ config.sasl.authname }}
    - sasldb: {{ config.sasl.sasldb_path }}
{%- endif %}
{%- if config.host.service %}

nova_libvirt-host-service-running:
  service.running:
    - name: {{ config.host.service }}
    - enable: true
    - watch:
{%-   for path, _ in host_files %}
      - file: {{ path }}
{%-   endfor %}
{%- endif %}
