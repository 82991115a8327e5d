"""The inference app: an OpenAI-compatible API and a Gradio chat UI over every adapter in the store.

Modules: ``registry`` (adapters from the store: LRU, hot reload, manifest checks), ``engine`` (the base
model and the batching generation loop), ``api`` (OpenAI schemas, routes and errors), ``auth`` (API keys
and Easy Auth), ``ui`` (Gradio), ``server`` (app factory and the ``lorastack serve`` command).

Nothing heavy is imported here: torch, transformers, fastapi and gradio load only in those modules.
"""
