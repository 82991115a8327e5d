"""``lorastack finetune --engine aml``: Azure ML command jobs and sweeps, tested offline and at the HTTP boundary.

- The job entities are built by azure-ai-ml and checked by its own offline validation, and their REST form
  (what the SDK would PUT) is asserted: PyTorch distribution, the store datastore mounted read-write, the
  sweep's primary metric and search space, the best trial's output wired into the publish step.
- Submission runs the real SDKs (azure-storage-file-share for the store, azure-ai-ml for the workspace) over
  azure-core's RequestsTransport answered by an in-memory Azure: tests/test_cloud.py's FakeAzure, extended
  with Azure ML's ARM routes (environment / component versions, jobs) in the REST shapes they return.
- The sweep's two steps (``lorastack aml trial`` and ``publish-best``) run for real on the tiny model.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest
import yaml
from azure_fakes import ARM, SUB, FakeAzure, FakeCredential, _json, client_kwargs
from test_cloud import write_job

from lorastack.cli import build_parser

pytest.importorskip("azure.ai.ml", reason="azure-ai-ml (the `aml` extra) is not installed")

from lorastack.azure import aml
from lorastack.commands import aml as aml_cmd

WS, COMPUTE, DATASTORE = "mlw-lorastack-dev", "gpu-a100-lowpri", "lorastore"
IMAGE = "crlorastack.azurecr.io/lorastack-trainer@sha256:" + "ab" * 32


def _b64(obj: dict) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


ARM_JWT = ".".join([_b64({"alg": "none", "typ": "JWT"}),
                    _b64({"aud": "https://management.azure.com", "oid": "11111111-0000-0000-0000-000000000000",
                          "tid": "22222222-0000-0000-0000-000000000000", "upn": "dev@example.com"}), "sig"])


AML_JWT = ".".join([_b64({"alg": "none", "typ": "JWT"}),
                    _b64({"aud": "https://ml.azure.com", "oid": "11111111-0000-0000-0000-000000000000",
                          "tid": "22222222-0000-0000-0000-000000000000"}), "sig"])


class JwtCredential(FakeCredential):
    """FakeCredential, but ARM and Azure ML tokens are JWT-shaped: azure-ai-ml reads their tenant and audience
    (a pipeline job carries the user's Azure ML token)."""

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        token = super().get_token(*scopes, **kwargs)
        if "management" in scopes[0]:
            return AccessToken(ARM_JWT, token.expires_on)
        if "ml.azure.com" in scopes[0]:
            return AccessToken(AML_JWT, token.expires_on)
        return token


class FakeAzureML(FakeAzure):
    """The store share and the ACA job of FakeAzure, plus one Azure ML workspace (ARM, api-version as sent)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.assets: dict[str, dict] = {}  # ARM id -> body (environment and component versions)
        self.jobs: dict[str, dict] = {}  # job name -> body as submitted
        self.deny_jobs: int | None = None

    def _arm(self, r):
        ws_root = (f"/subscriptions/{self.subscription}/resourceGroups/{self.rg}/providers/"
                   f"Microsoft.MachineLearningServices/workspaces/{WS}")
        if "/Microsoft.MachineLearningServices/" not in r.path:
            return super()._arm(r)
        if r.headers.get("authorization") != f"Bearer {ARM_JWT}":
            return _json(r, 401, {"error": {"code": "AuthenticationFailed", "message": "no token"}})
        if not r.path.startswith(ws_root + "/"):
            return _json(r, 404, {"error": {"code": "ResourceNotFound", "message": f"{r.path} not found"}})
        rest = r.path[len(ws_root) + 1 :]
        m = re.fullmatch(r"(environments|components)/([\w.-]+)/versions/([\w.-]+)", rest)
        if m and r.method == "PUT":
            body = json.loads(r.body)
            self.assets[r.path] = body
            kind = m.group(1)
            return _json(r, 200, {"id": r.path, "name": m.group(3),
                                  "type": f"Microsoft.MachineLearningServices/workspaces/{kind}/versions",
                                  "properties": body["properties"], "systemData": {}})
        m = re.fullmatch(r"computes/([\w.-]+)", rest)
        if m and r.method == "GET":  # pipelines check their compute exists (Compute - Get)
            if m.group(1) != COMPUTE:
                return _json(r, 404, {"error": {"code": "ResourceNotFound", "message": f"compute {m.group(1)}"}})
            return _json(r, 200, {"id": r.path, "name": COMPUTE, "location": "swedencentral",
                                  "type": "Microsoft.MachineLearningServices/workspaces/computes",
                                  "properties": {"computeType": "AmlCompute", "provisioningState": "Succeeded",
                                                 "properties": {"vmSize": "Standard_NC24ads_A100_v4",
                                                                "vmPriority": "LowPriority",
                                                                "scaleSettings": {"maxNodeCount": 4,
                                                                                  "minNodeCount": 0}}}})
        m = re.fullmatch(r"jobs/([\w.-]+)", rest)
        if m and r.method == "PUT":
            if self.deny_jobs:
                return _json(r, self.deny_jobs, {"error": {"code": "AuthorizationFailed", "message":
                             "The client does not have authorization to perform action "
                             "'Microsoft.MachineLearningServices/workspaces/jobs/write'."}})
            body = json.loads(r.body)
            self.jobs[m.group(1)] = body
            props = dict(body["properties"], status="NotStarted",
                         services={"Studio": {"endpoint": f"https://ml.azure.com/runs/{m.group(1)}"}})
            return _json(r, 201, {"id": r.path, "name": m.group(1),
                                  "type": "Microsoft.MachineLearningServices/workspaces/jobs", "properties": props})
        return _json(r, 404, {"error": {"code": "ResourceNotFound", "message": f"{r.method} {r.path}"}})


@pytest.fixture
def fake() -> FakeAzureML:
    return FakeAzureML("lorastackdev01", "store", SUB, "rg-lorastack-dev", "job-train-dev")


@pytest.fixture
def outputs_file(tmp_path, fake):
    """Stack outputs with the platform's Azure ML resources (and an output this code does not know)."""
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps({
        "subscriptionId": fake.subscription, "resourceGroupName": fake.rg, "acaJobName": fake.job,
        "storageAccountName": fake.account, "fileShareName": fake.share, "location": "swedencentral",
        "amlWorkspaceName": WS, "amlComputeName": COMPUTE, "amlDatastoreName": DATASTORE,
        "lorastack:images": {"trainer": IMAGE, "inference": "x"}, "somethingNew": 1,
    }))
    return path


@pytest.fixture(autouse=True)
def _no_ambient_env(monkeypatch):
    for var in ("LORASTACK_OUTPUTS", "LORASTACK_AML_WORKSPACE", "LORASTACK_AML_COMPUTE", "LORASTACK_AML_DATASTORE",
                "LORASTACK_TRAINER_IMAGE", "LORASTACK_SUBSCRIPTION_ID", "AZURE_SUBSCRIPTION_ID",
                "LORASTACK_RESOURCE_GROUP", "LORASTACK_TRAIN_ENGINE"):
        monkeypatch.delenv(var, raising=False)


def target() -> aml.AmlTarget:
    return aml.AmlTarget(SUB, "rg", WS, COMPUTE, DATASTORE, IMAGE)


def spec_with(tmp_path: Path, **extra):
    from lorastack.spec import load_spec

    return load_spec(write_job(tmp_path, **extra))


# -- outputs ------------------------------------------------------------------------------------------------


def test_target_from_outputs_tolerates_unknown_keys_and_names_missing_ones(tmp_path, outputs_file):
    t = aml.load_target(outputs_file)
    assert (t.workspace, t.compute, t.datastore, t.image) == (WS, COMPUTE, DATASTORE, IMAGE)
    assert t.store_uri == f"azureml://datastores/{DATASTORE}/paths/"
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"subscriptionId": SUB, "resourceGroupName": "rg"}))
    with pytest.raises(aml.AmlError) as err:
        aml.load_target(bare, environ={})
    msg = str(err.value)
    assert all(k in msg for k in ("'amlWorkspaceName'", "'amlComputeName'", "'amlDatastoreName'", "'trainerImage'"))
    env = {"LORASTACK_AML_WORKSPACE": WS, "LORASTACK_AML_COMPUTE": "bad name!", "LORASTACK_AML_DATASTORE": "d1",
           "LORASTACK_TRAINER_IMAGE": IMAGE}
    with pytest.raises(aml.AmlError, match="amlComputeName: 'bad name!' is not a valid"):
        aml.load_target(bare, environ=env)


# -- the entities, offline ----------------------------------------------------------------------------------


def rest_of(job) -> dict:
    """The REST body's properties the SDK would PUT for ``job`` (a command node becomes its CommandJob)."""
    job = job._to_job() if hasattr(job, "_to_job") else job
    return job._to_rest_object().properties.as_dict()


def test_command_job_is_valid_and_runs_the_trainer_distributed_on_the_store():
    job = aml.command_job(target(), "plants-abc123", nodes=2, gpus_per_node=4)
    aml.validate(job)  # azure-ai-ml's own offline validation
    rest = rest_of(job)
    assert rest["jobType"] == "Command"
    assert rest["command"] == "lorastack train --store ${{outputs.store}} --run plants-abc123"
    assert rest["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 4}
    assert rest["resources"]["instanceCount"] == 2
    store = rest["outputs"]["store"]
    assert store["uri"] == f"azureml://datastores/{DATASTORE}/paths/" and store["mode"] == "ReadWriteMount"
    assert rest["environmentVariables"]["LORASTACK_NPROC"] == "1"  # Azure ML starts one process per GPU
    assert rest["computeId"] == COMPUTE and rest["tags"]["lorastack_run_id"] == "plants-abc123"
    assert rest_of(aml.command_job(target(), "r", nodes=1, gpus_per_node=1)).get("distribution") is None
    with pytest.raises(aml.AmlError, match="must be at least 1"):
        aml.command_job(target(), "r", nodes=0)


def test_sweep_pipeline_ranks_trials_by_eval_loss_and_publishes_the_best(tmp_path):
    spec = spec_with(tmp_path, sweep={"learning_rate": [1e-4, 2e-4], "lora_r": [8, 16], "sampling": "grid",
                                      "max_trials": 4, "max_concurrent_trials": 2})
    job = aml.sweep_pipeline(target(), "plants-abc123", spec)
    aml.validate(job)
    jobs = rest_of(job)["jobs"]
    assert set(jobs) == {"trials", "publish_best"}
    sweep, publish = jobs["trials"], jobs["publish_best"]
    assert sweep["type"] == "sweep" and sweep["objective"] == {"goal": "minimize", "primary_metric": "eval_loss"}
    assert sweep["sampling_algorithm"] == "grid"
    assert sweep["search_space"] == {"learning_rate": {"type": "choice", "values": [0.0001, 0.0002]},
                                     "lora_r": {"type": "choice", "values": [8, 16]}}
    assert sweep["limits"] == {"max_concurrent_trials": 2, "max_total_trials": 4}
    assert sweep["inputs"]["store"]["mode"] == "ReadOnlyMount"  # trials never write the shared store
    trial_cmd = sweep["trial"]["properties"]["componentSpec"]["command"]
    assert "lorastack aml trial" in trial_cmd and "--learning-rate ${{inputs.learning_rate}}" in trial_cmd
    assert "--epochs" not in trial_cmd  # only what the sweep lists
    assert publish["inputs"]["best"]["value"] == "${{parent.jobs.trials.outputs.trial}}"
    assert publish["outputs"]["store"]["uri"] == f"azureml://datastores/{DATASTORE}/paths/"


def test_sweep_without_validation_data_or_values_is_refused_before_anything_is_sent(tmp_path):
    spec = spec_with(tmp_path, sweep={"lora_r": [8]})
    no_val = spec.model_copy(update={"validation_file": None})
    with pytest.raises(aml.AmlError, match="needs validation_file"):
        aml.sweep_pipeline(target(), "r", no_val)
    empty = spec_with(tmp_path, sweep={"sampling": "random"})
    with pytest.raises(aml.AmlError, match="lists no values"):
        aml.sweep_pipeline(target(), "r", empty)


def test_bad_sweep_values_name_the_key(tmp_path):
    from lorastack.spec import SpecError, load_spec

    with pytest.raises(SpecError, match="sweep"):
        load_spec(write_job(tmp_path, sweep={"lora_r": ["big"]}))


# -- submission at the HTTP boundary ------------------------------------------------------------------------


def _submit(fake, outputs_file, job, *extra, cred=None) -> int:
    args = build_parser().parse_args(["finetune", job, "--engine", "aml", "--outputs", str(outputs_file), *extra])
    return aml_cmd.finetune_aml_command(args, credential=cred or JwtCredential(), client_kwargs=client_kwargs(fake))


def test_submit_uploads_the_run_to_the_store_and_creates_a_distributed_command_job(
    fake, outputs_file, tmp_path, capsys
):
    code = _submit(fake, outputs_file, write_job(tmp_path), "--nodes", "2", "--gpus-per-node", "4")
    out, err = capsys.readouterr()
    assert code == 0, err
    run_id = re.search(r"run (\S+) submitted", out).group(1)
    # the same store layout as an ACA submission, but not queued: the ACA job must not claim it
    assert f"runs/{run_id}/spec.yaml" in fake.files and not any(p.startswith("queue/") for p in fake.files)
    spec_doc = yaml.safe_load(bytes(fake.files[f"runs/{run_id}/spec.yaml"]))
    assert spec_doc["run_id"] == run_id
    # the trainer image as an environment, then the job, in Azure ML's REST shape
    (env_body,) = [b for p, b in fake.assets.items() if "/environments/" in p]
    assert env_body["properties"]["image"] == IMAGE
    (name, body) = next(iter(fake.jobs.items()))
    props = body["properties"]
    assert props["jobType"] == "Command" and props["displayName"] == run_id
    assert props["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 4}
    assert props["resources"]["instanceCount"] == 2
    assert props["computeId"].endswith(f"/workspaces/{WS}/computes/{COMPUTE}")
    assert props["outputs"]["store"]["uri"] == f"azureml://datastores/{DATASTORE}/paths/"
    assert props["command"].endswith(f"--run {run_id}")
    assert f"{name}" in out and "follow it with: lorastack status" in out
    arm = [r for r in fake.requests if r.host == ARM]
    assert all(r.query.get("api-version") for r in arm)


def test_submit_a_sweep_creates_one_pipeline_job(fake, outputs_file, tmp_path, capsys):
    job = write_job(tmp_path, sweep={"learning_rate": [1e-4, 3e-4], "epochs": [1, 2], "sampling": "random"})
    assert _submit(fake, outputs_file, job) == 0, capsys.readouterr().err
    (body,) = fake.jobs.values()
    props = body["properties"]
    assert props["jobType"] == "Pipeline"
    assert "sweep pipeline" in capsys.readouterr().out
    assert any("/components/" in p for p in fake.assets)  # the trial and publish steps


def test_submit_refused_names_the_role_and_a_missing_output_fails_before_any_request(
    fake, outputs_file, tmp_path, capsys
):
    fake.deny_jobs = 403
    assert _submit(fake, outputs_file, write_job(tmp_path)) == 1
    assert "AzureML Data Scientist" in capsys.readouterr().err
    n = len(fake.requests)
    doc = json.loads(outputs_file.read_text())
    del doc["amlComputeName"]
    outputs_file.write_text(json.dumps(doc))
    assert _submit(fake, outputs_file, write_job(tmp_path)) == 1
    assert "'amlComputeName'" in capsys.readouterr().err and len(fake.requests) == n


# -- the sweep's steps, for real on the tiny model ---------------------------------------------------------------


@pytest.mark.slow
def test_trials_train_into_their_own_folders_and_the_best_is_published_once(tmp_path, tiny_llama, capsys):
    from test_trainer import PLANT_VAL
    from test_trainer import write_job as tiny_job

    from lorastack.store import Store
    from lorastack.trainer import prepare_run

    shared = Store(tmp_path / "shared").init()
    job = tiny_job(tmp_path, tiny_llama, name="plants", validation=PLANT_VAL, max_steps=6)
    run_id = prepare_run(shared, job)
    losses = {}
    for lr in (1e-5, 5e-3):
        out = tmp_path / f"trial-{lr}"
        args = argparse.Namespace(store=str(shared.root), run=run_id, out=str(out), learning_rate=lr,
                                  lora_r=None, epochs=None)
        assert aml_cmd.trial_command(args) == 0, capsys.readouterr()
        info = json.loads((out / aml.TRIAL_METRICS).read_text())
        assert info["overrides"] == {"training.learning_rate": lr} and info["run_id"] == run_id
        trial_spec = yaml.safe_load((out / "store" / "runs" / info["trial_run_id"] / "spec.yaml").read_text())
        assert trial_spec["training"]["learning_rate"] == lr
        losses[out] = info["eval_loss"]
    assert not shared.adapter_names()  # trials never publish to the shared store
    best = min(losses, key=losses.get)
    args = argparse.Namespace(trial=str(best), store=str(shared.root), run=run_id)
    assert aml_cmd.publish_best_command(args) == 0
    published = shared.adapter("plants")  # verified
    assert published.ref == "plants@v1" and shared.adapter_versions("plants") == ["v1"]
    assert published.manifest["sweep"]["eval_loss"] == losses[best] == min(losses.values())
    assert published.manifest["base_model"] == str(tiny_llama)
    wrong = argparse.Namespace(trial=str(best), store=str(shared.root), run="other-run")
    assert aml_cmd.publish_best_command(wrong) == 1
