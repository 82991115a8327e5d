"""lorastack's Pulumi program: typed stack settings, one ComponentResource per file, guardrail policies.

Pure planning and validation (GPU profiles, names, probe sizing, settings, policies) live in modules that
never import Pulumi, so they are table-tested without mocks; the components only wire resources.
"""
