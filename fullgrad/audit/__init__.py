"""The dataset-wide attribution audit: where a model looks, per class, and which images look
like shortcuts.

- :mod:`fullgrad.audit.stats`: per-image statistics of a map (pure numpy);
- :mod:`fullgrad.audit.settings`: :class:`AuditSettings`, every threshold with its default;
- :mod:`fullgrad.audit.transforms`: the Beam combiners and ``ComputeAudit``;
- :mod:`fullgrad.audit.report`: ``write_audit`` -> ``audit.json`` and ``report.html``;
(``fullgrad audit --maps DIR``, the Beam job that re-audits written maps, is
:mod:`fullgrad.beam.audit_job`: the audit sits below the Beam layer.)

Example:
    >>> from fullgrad.audit.transforms import AuditSettings, ComputeAudit
    >>> from fullgrad.audit.report import write_audit
    >>> explained | ComputeAudit(AuditSettings()) | beam.Map(write_audit, "out/")
"""
