"""The inference image's launcher (``python -m lorastack.serve.launch``): which environment runs ``lorastack serve``.

Fast: the engine choice (``--engine``, else LORASTACK_ENGINE, else builtin, as ``lorastack serve`` decides), the
errors that name what to set, and a real exec into each environment (this venv and the vLLM CPU venv of
``make vllm-env``). The image tests (tests/test_images.py) run the launcher as the image's ENTRYPOINT and serve
through it with both engines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorastack.serve import launch

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("LORASTACK_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
OWN_PREFIX = sys.prefix  # this test environment: the built-in engine's


@pytest.mark.parametrize(
    ("argv", "environ", "engine"),
    [
        (["serve"], {}, "builtin"),  # nothing set: the built-in engine, as `lorastack serve`
        (["serve"], {"LORASTACK_ENGINE": "vllm"}, "vllm"),  # what the stack sets on GPU profiles
        (["serve"], {"LORASTACK_ENGINE": " VLLM "}, "vllm"),
        (["serve", "--engine", "builtin"], {"LORASTACK_ENGINE": "vllm"}, "builtin"),  # the flag wins
        (["serve", "--port", "8000", "--engine=vllm"], {}, "vllm"),
        (["serve", "--", "--engine", "vllm"], {}, "builtin"),  # after `--` it is not an option
    ],
)
def test_engine_is_the_flag_then_the_env_then_builtin(argv, environ, engine):
    assert launch.requested_engine(argv, environ) == engine


def test_an_unknown_engine_is_named_with_where_it_came_from():
    with pytest.raises(launch.LaunchError, match=r"LORASTACK_ENGINE='tgi' is not an engine; use one of: builtin, vllm"):
        launch.requested_engine(["serve"], {"LORASTACK_ENGINE": "tgi"})
    with pytest.raises(launch.LaunchError, match=r"--engine='tgi' is not an engine"):
        launch.requested_engine(["serve", "--engine", "tgi"], {})


def test_builtin_runs_this_environments_lorastack_and_vllm_the_vllm_venvs(tmp_path):
    program, argv = launch.target(["serve", "--port", "8000"], {}, OWN_PREFIX)
    assert program == str(Path(OWN_PREFIX) / "bin" / "lorastack") and argv == [program, "serve", "--port", "8000"]
    if VLLM_PYTHON.is_file():
        venv = VLLM_PYTHON.parent.parent
        program, argv = launch.target(["serve"], {"LORASTACK_ENGINE": "vllm", "LORASTACK_VLLM_VENV": str(venv)},
                                      OWN_PREFIX)
        assert program == str(venv / "bin" / "lorastack") and argv[1:] == ["serve"]
    # other commands (e.g. `docker run IMAGE adapters list`) run in the built-in environment whatever the engine
    program, _ = launch.target(["adapters", "list"], {"LORASTACK_ENGINE": "vllm"}, OWN_PREFIX)
    assert program.startswith(OWN_PREFIX)


def test_a_missing_vllm_environment_says_what_to_set(tmp_path, capsys):
    """An image without vLLM (or a wrong LORASTACK_VLLM_VENV) fails at start with the fix, not an ImportError."""
    missing = tmp_path / "no-vllm"
    with pytest.raises(launch.LaunchError) as err:
        launch.target(["serve"], {"LORASTACK_ENGINE": "vllm", "LORASTACK_VLLM_VENV": str(missing)}, OWN_PREFIX)
    msg = str(err.value)
    assert f"{missing} (LORASTACK_VLLM_VENV)" in msg and "no lorastack command" in msg
    assert "inference.engine: builtin" in msg and "make vllm-env" in msg
    # through main(): exit 2 and the message on stderr, nothing exec'd
    old = dict(os.environ)
    try:
        os.environ.update(LORASTACK_ENGINE="vllm", LORASTACK_VLLM_VENV=str(missing))
        assert launch.main(["serve"]) == 2
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert capsys.readouterr().err.startswith("lorastack: the vllm engine's environment")


def _launch(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorastack.serve.launch", *args],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
             **env},
        capture_output=True, text=True, timeout=60, check=False,
    )


def test_the_launcher_execs_the_engines_lorastack_for_real():
    """A real exec: the chosen environment's `lorastack serve --help` answers (exit 0) in place of the launcher."""
    res = _launch(["serve", "--help"], LORASTACK_ENGINE="builtin")
    assert res.returncode == 0 and "--engine" in res.stdout, res.stderr
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"the vLLM environment is not built ({VLLM_PYTHON} is missing): run `make vllm-env`")
    res = _launch(["serve", "--help"], LORASTACK_ENGINE="vllm", LORASTACK_VLLM_VENV=str(VLLM_PYTHON.parent.parent))
    assert res.returncode == 0 and "--engine" in res.stdout, res.stderr
    res = _launch(["serve", "--help"], LORASTACK_ENGINE="nope")
    assert res.returncode == 2 and "LORASTACK_ENGINE='nope' is not an engine" in res.stderr


def test_launching_imports_nothing_heavy():
    """The launcher runs before every start: standard library only, no torch/vLLM/fastapi before the exec."""
    code = ("import sys, lorastack.serve.launch; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'vllm', 'fastapi', 'gradio', 'pydantic', 'yaml')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert res.stdout.strip() == "[]"
