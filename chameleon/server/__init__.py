"""The appliance's HTTP face: ``chameleon serve``.

- ``launch``: builds what is missing, starts the retrieval tier and the HTTP server, stops
  everything on SIGTERM; ``settings``: flags > environment > YAML file > defaults.
- ``api``: assembles the FastAPI app from ``routes/`` (probes, Chameleon's routes, the OpenAI
  ones), ``errors`` (each error kind's status, OpenAI's error shape), ``middleware`` (request ids,
  body limit, access log, latency metrics), ``context`` (what the routes share: admission, API
  keys, running generations) and ``streaming`` (whole answers and server-sent events);
  ``schemas``: the request and response bodies.
- ``service``: what the routes call (the models, retrieval, generation, behind thread-safe calls),
  with ``text_stream`` (detokenization and stop strings) and ``served_index`` (the index version
  served, its tier, reloads); ``metrics``: Prometheus.
"""
