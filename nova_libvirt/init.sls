# -*- coding: utf-8 -*-
# vim: ft=sls
{%- set tplroot = tpldir.split("/")[0] %}
{%- from tplroot ~ "/map.jinja" import config with context %}

include:
  - {{ tplroot }}.config
{%- if not config.container.enabled and config.host.manage_daemon %}
  - {{ tplroot }}.host
{%- endif %}
