"""The appliance's HTTP face: ``chameleon serve``.

``settings`` (flags > environment > YAML file > defaults), ``service`` (the models, the passage
index and the retrieval tier behind thread-safe calls; a changed index served again), ``api``
(FastAPI routes: the RAG API, the OpenAI-compatible endpoints and the reload), ``metrics``
(Prometheus) and ``launch`` (builds what is missing, starts the retrieval tier and the HTTP
server, stops everything on SIGTERM).
"""
