"""Serving: a continuous-batching engine (:mod:`.engine`) with a mode per request, its scheduler
(:mod:`.scheduler`) and ``nld-serve``, an OpenAI-compatible HTTP server (:mod:`.server`)."""
