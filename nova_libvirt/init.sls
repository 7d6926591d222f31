# -*- coding: utf-8 -*-
# vim: ft=sls
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import config with context %}

include:
  - {{ tplroot }}.config
{%- if config.container.enabled %}
  - {{ tplroot }}.container
{%- elif config.host.manage_daemon %}
  - {{ tplroot }}.host
{%- endif %}
{%- if config.tls.enabled and config.tls.manage_certs %}

# New certificates reach the running libvirtd without a restart.
nova_libvirt-tls-daemon-updated:
  nova_libvirt_tls.daemon_updated:
    - name: libvirtd
    - onchanges:
      - nova_libvirt_tls: nova_libvirt-tls-files-managed
{%-   if config.container.enabled %}
    - require:
      - sls: {{ tplroot }}.container
{%-   elif config.host.manage_daemon %}
    - require:
      - sls: {{ tplroot }}.host
{%-   endif %}
{%- endif %}
