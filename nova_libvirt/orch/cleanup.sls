# -*- coding: utf-8 -*-
# vim: ft=sls
#
# salt-run state.orchestrate nova_libvirt.orch.cleanup pillar='{"target": "compute*"}'
#
# Runs nova_libvirt.clean on every targeted minion at once: one host's
# refusal does not stop the others; the result names every host and fails
# if any refused, did not answer, or none matched. tgt_type defaults to glob.
{%- set target = pillar.get("target") %}
{%- set tgt_type = pillar.get("tgt_type", "glob") %}
{%- if not target %}

nova_libvirt-orch-cleanup-target-missing:
  test.fail_without_changes:
    - name: target
    - comment: >-
        Say which compute hosts to clean up:
        salt-run state.orchestrate nova_libvirt.orch.cleanup pillar='{"target": "compute*"}'
{%- else %}

nova_libvirt-orch-cleanup-hosts-cleaned:
  salt.state:
    - tgt: {{ target | json }}
    - tgt_type: {{ tgt_type }}
    - sls: nova_libvirt.clean
    - expect_minions: true
{%- endif %}
