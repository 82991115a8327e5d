"""Entry point for the Pulumi CLI (Pulumi.yaml: ``main: provisioning/``); the program itself is program.run()."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo root, if not pip-installed

from provisioning.program import run

run()
