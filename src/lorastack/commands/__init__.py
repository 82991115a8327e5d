"""Command handlers: argument handling, printing, progress; the CLI layer.

``lorastack.cli`` declares the arguments and imports one of these modules lazily. Handlers call into the
domain modules (store, trainer, serving, Azure operations, provisioning); no domain module imports from here.
"""
