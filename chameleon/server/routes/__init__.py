"""The HTTP routes, one router per family: probes (health, readiness, metrics), Chameleon's own
(``/v1/rag``, ``/v1/search``, ``/admin/reload``) and the OpenAI-compatible ones."""
