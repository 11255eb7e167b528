"""Ray Serve: an OpenAI-compatible HTTP server over a continuous-batching KV-cache engine.

Import ``raytron.serve.app`` for ``build_app``; this package import stays light (no Ray, no torch).
"""
