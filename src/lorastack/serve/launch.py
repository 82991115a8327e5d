"""The inference image's entrypoint: run ``lorastack`` from the environment of the chosen engine.

The inference image holds two Python environments: ``/opt/lorastack`` (the built-in engine: torch, transformers,
peft, bitsandbytes at the ``ml`` extra's pins) and ``/opt/vllm`` (vLLM's CUDA build with its own torch and an
older transformers; the two cannot share one environment). The container starts

    python -m lorastack.serve.launch serve --store /mnt/store --host 0.0.0.0 --port 8000 [args...]

and this module replaces itself (``os.execv``, same PID) with ``<env>/bin/lorastack serve ...`` of the engine's
environment, so the serving python is PID 1 and gets the runtime's SIGTERM itself (no shell, no parent process in
between). The engine is ``--engine`` in the arguments, else ``$LORASTACK_ENGINE`` (what the stack sets), else
builtin: the same order as ``lorastack serve`` itself, which then reads the same value. Other commands run in
the built-in environment.

Standard library only, and nothing from the rest of lorastack is imported: this runs before every start.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV_ENGINE = "LORASTACK_ENGINE"  # the same name serve.vllm_engine reads (not imported: it pulls the engine in)
ENV_VLLM_VENV = "LORASTACK_VLLM_VENV"
ENGINES = ("builtin", "vllm")
DEFAULT_VLLM_VENV = "/opt/vllm"


class LaunchError(Exception):
    """Nothing can be started: the message says what to set."""


def requested_engine(argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """``--engine`` of a ``serve`` command line, else ``$LORASTACK_ENGINE``, else builtin."""
    flag = None
    if argv and argv[0] == "serve":
        for i, arg in enumerate(argv):
            if arg == "--":
                break
            if arg == "--engine" and i + 1 < len(argv):
                flag = argv[i + 1]
            elif arg.startswith("--engine="):
                flag = arg.split("=", 1)[1]
    engine = (flag or environ.get(ENV_ENGINE) or "builtin").strip().lower()
    if engine not in ENGINES:
        source = "--engine" if flag else ENV_ENGINE
        raise LaunchError(f"{source}={engine!r} is not an engine; use one of: {', '.join(ENGINES)}")
    return engine


def target(argv: Sequence[str], environ: Mapping[str, str], own_prefix: str) -> tuple[str, list[str]]:
    """(program, argv) to exec: the chosen engine's ``lorastack`` with ``argv`` as its arguments.

    ``own_prefix`` is the environment this launcher runs in (the built-in engine's).
    """
    engine = requested_engine(argv, environ) if argv and argv[0] == "serve" else "builtin"
    if engine == "vllm":
        venv = Path(environ.get(ENV_VLLM_VENV) or DEFAULT_VLLM_VENV)
        where = f"{venv} ({ENV_VLLM_VENV})"
        hint = (f"use the lorastack inference image (it has vLLM at {DEFAULT_VLLM_VENV}), point {ENV_VLLM_VENV} at a "
                f"virtualenv with lorastack and vLLM (`make vllm-env`), or serve with the built-in engine "
                f"({ENV_ENGINE}=builtin; in a stack file: inference.engine: builtin)")
    else:
        venv = Path(own_prefix)
        where, hint = str(venv), "reinstall the image or run `pip install lorastack[serve]` in that environment"
    program = venv / "bin" / "lorastack"
    if not os.access(program, os.X_OK):
        raise LaunchError(f"the {engine} engine's environment {where} has no lorastack command "
                          f"({program} is missing); {hint}")
    return str(program), [str(program), *argv]


def main(argv: Sequence[str] | None = None) -> int:
    """Exec the engine's ``lorastack`` (never returns on success); exit 2 with a message when it cannot."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        program, exec_argv = target(args, os.environ, sys.prefix)
    except LaunchError as exc:
        print(f"lorastack: {exc}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(program, exec_argv)  # same PID: the runtime's SIGTERM reaches the server itself
    return 0  # pragma: no cover - execv does not return


if __name__ == "__main__":
    sys.exit(main())
