"""Scripts the GitHub workflows run (``python -m ci.<name> ...``): plain Python, stdlib + PyYAML + lorastack.

Each module is a small CLI with ``main(argv)`` and pure functions the tests in ``tests/test_gitops*.py`` call.
"""
