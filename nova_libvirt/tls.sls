# -*- coding: utf-8 -*-
# vim: ft=sls
#
# The five TLS files, per minion or shared, validated together before any is
# written; Kolla's config-libvirt-tls.yml. With tls:manage_certs: false the
# files in place are only checked.
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import config with context %}
{%- if config.tls.enabled %}

nova_libvirt-tls-files-managed:
  nova_libvirt_tls.managed:
    - name: {{ grains.id }}
{%- endif %}
