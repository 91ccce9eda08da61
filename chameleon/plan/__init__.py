"""Sizing the tiers: what each tier's work costs on a host (``profiles``, measured by ``measure``),
and the deployment that serves a target (``model``). ``chameleon profile retrieval|inference``
measures; ``chameleon plan`` sizes."""
