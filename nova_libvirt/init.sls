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
{%- if config.tls.enabled %}

# The running libvirtd takes new certificates without a restart, whoever
# installed them: what its TLS port presents is compared on every run.
nova_libvirt-tls-daemon-updated:
  nova_libvirt_tls.daemon_updated:
    - name: libvirtd
    - require:
      - nova_libvirt_tls: nova_libvirt-tls-files-managed
{%-   if config.container.enabled %}
      - sls: {{ tplroot }}.container
{%-   elif config.host.manage_daemon %}
      - sls: {{ tplroot }}.host
{%-   endif %}
{%- endif %}
