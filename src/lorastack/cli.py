"""The ``lorastack`` command.

Every subcommand's arguments are declared here (cheap), and its handler is imported only when that
subcommand runs, so ``lorastack --help`` never imports torch, transformers, Pulumi or the Azure SDKs.
A handler takes the parsed ``argparse.Namespace`` and returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> "module:function" (imported lazily)
HANDLERS = {
    "validate": "lorastack.commands.data:validate_command",
    "finetune": "lorastack.commands.train:finetune_command",
    "train": "lorastack.commands.train:train_command",
    "status": "lorastack.commands.adapters:status_command",
    "serve": "lorastack.commands.serve:serve_command",
    "demo": "lorastack.demo:demo_command",
    "plan": "provisioning.plan:plan_command",
    "stack-new": "provisioning.selfservice:stack_new_command",
    "logs": "lorastack.commands.cloud:logs_command",
    "secrets": "lorastack.commands.ops:secrets_command",
    "endpoint": "lorastack.commands.ops:endpoint_command",
    "restart": "lorastack.commands.ops:restart_command",
    "export": "lorastack.commands.ops:export_command",
    "preflight": "lorastack.commands.ops:preflight_command",
    "store": "lorastack.commands.ops:store_command",
    # lifecycle: evaluation, adapter versions and runs on a store
    "eval": "lorastack.commands.adapters:eval_command",
    "adapters": "lorastack.commands.adapters:adapters_command",
    "runs": "lorastack.commands.adapters:runs_command",
    "aml": "lorastack.commands.aml:aml_command",
}


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="DIR",
        help="adapter store directory (default: $LORASTACK_STORE or ./.lorastack/store)",
    )


def _stack_args(p: argparse.ArgumentParser, subscription: bool = False) -> None:
    """``--stack NAME`` and ``--project-dir`` (and ``--subscription``) for the commands that read a stack file."""
    p.add_argument("--stack", required=True, metavar="NAME", help="stack name (stacks/Pulumi.<NAME>.yaml)")
    if subscription:
        p.add_argument("--subscription", metavar="ID",
                       help="subscription id (default: the stack file, $AZURE_SUBSCRIPTION_ID)")
    p.add_argument("--project-dir", metavar="DIR", help="directory holding Pulumi.yaml (default: search upwards)")


def _outputs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--outputs",
        metavar="FILE",
        help="cloud: stack outputs JSON (`pulumi stack output --json > FILE`; default: $LORASTACK_OUTPUTS)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorastack",
        description="Fine-tune LLM adapters with QLoRA and serve them, locally or on Azure Container Apps GPUs.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="check chat fine-tuning JSONL files before any GPU is paid for")
    p.add_argument("files", nargs="+", metavar="FILE", help="training JSONL files in the Azure/OpenAI chat format")
    p.add_argument(
        "--validation",
        action="append",
        default=[],
        metavar="FILE",
        help="a validation JSONL file (no 10-example minimum; examples without answers are warnings); repeatable",
    )
    p.add_argument("--base-model", metavar="M", help="count tokens with this model's tokenizer and chat template")
    p.add_argument("--base-revision", metavar="REV", help="revision of --base-model (hub commit, branch or tag)")
    p.add_argument(
        "--store",
        metavar="DIR",
        help="store whose model cache (<store>/models) --base-model is looked up in, as finetune does "
        "(default: $LORASTACK_STORE or ./.lorastack/store; HF_HOME or HF_HUB_CACHE win when set)",
    )
    p.add_argument("--max-seq-len", type=int, metavar="N", help="per-example token limit (default: model context)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("finetune", help="fine-tune an adapter from a run spec (jobs/<name>.yaml)")
    p.add_argument("spec", metavar="JOB.yaml", help="run spec")
    p.add_argument("--local", action="store_true", help="train in this process instead of the Azure job")
    _store_arg(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any spec field, dotted for nested ones (e.g. --set lora.r=32); repeatable",
    )
    p.add_argument("--base-model", metavar="M", help="override base_model")
    p.add_argument("--max-steps", type=int, metavar="N", help="override training.max_steps")
    p.add_argument("--epochs", type=float, metavar="N", help="override training.epochs")
    p.add_argument("--time-budget", metavar="DURATION", help="override time_budget (e.g. 30m, 2h)")
    _outputs_arg(p)
    p.add_argument("--wait", action="store_true", help="cloud: follow the run until it ends (progress lines)")
    p.add_argument("--verbose", action="store_true", help="also print the libraries' own logs and every step")

    p = sub.add_parser("train", help="run a prepared run from the store (the training image's entrypoint)")
    _store_arg(p)
    p.add_argument(
        "--run",
        metavar="RUN_ID",
        help="run id under <store>/runs/, or 'next' to claim the oldest queued run "
        "(default: $LORASTACK_RUN_ID, else 'next', which is what the Azure job does)",
    )
    p.add_argument("--verbose", action="store_true", help="also print the libraries' own logs and every step")

    p = sub.add_parser("status", help="a run's status, or every run and adapter (cloud store, or --store DIR)")
    p.add_argument("run_id", nargs="?", metavar="RUN_ID", help="run id printed by `lorastack finetune`")
    _outputs_arg(p)
    p.add_argument("--store", metavar="DIR", help="a local store directory instead of the cloud store")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("serve", help="serve every adapter in the store (OpenAI-compatible API + chat UI)")
    p.add_argument("--local", action="store_true", help="run on this machine (no Azure)")
    _store_arg(p)
    p.add_argument("--base-model", metavar="M", help="base model (default: $LORASTACK_BASE_MODEL, else the adapters')")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--no-auth", action="store_true", help="no API key (allowed on loopback only)")
    p.add_argument("--base-revision", metavar="REV", help="base model revision (default: $LORASTACK_BASE_REVISION)")
    p.add_argument("--no-4bit", action="store_true", help="load the base model unquantized (default: 4-bit NF4)")
    p.add_argument("--max-batch-size", type=int, default=16, metavar="N", help="rows decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N", help="waiting requests before 429 (default 64)")
    p.add_argument(
        "--max-loaded-adapters", type=int, default=8, metavar="N", help="adapters kept in memory, LRU (default 8)"
    )
    p.add_argument(
        "--trust-easy-auth",
        action="store_true",
        help="let ACA Easy Auth headers sign users into the UI (only when Easy Auth is enabled on the app)",
    )

    p = sub.add_parser("demo", help="validate, fine-tune and serve a sample adapter locally (no Azure)")
    _store_arg(p)
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--no-serve", action="store_true", help="stop after publishing the adapter")

    _lifecycle_parsers(sub)

    p = sub.add_parser("plan", help="render a stack offline under Pulumi mocks and check the policies")
    _stack_args(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument(
        "--against",
        metavar="STATE.json",
        help="the live stack (`pulumi stack export` or `pulumi stack output --json`): report changes Azure refuses",
    )

    p = sub.add_parser("stack", help="self-service stacks")
    stack_sub = p.add_subparsers(dest="stack_command", metavar="ACTION", required=True)
    q = stack_sub.add_parser("new", help="create stacks/Pulumi.<team>.yaml within the platform guardrails")
    q.add_argument("team", metavar="TEAM", help="team name (the stack name)")
    q.add_argument("--location", metavar="REGION", help="Azure region (must be allowed by the guardrails)")
    q.add_argument("--gpu", metavar="PROFILE", help="inference GPU workload profile type")
    q.add_argument("--max-replicas", type=int, metavar="N", help="inference max replicas")
    q.add_argument("--project-dir", metavar="DIR", help="directory holding Pulumi.yaml (default: search upwards)")

    # -- cloud operations (logs, secrets, endpoint, restart, export, preflight, store rotate-key) -----------------
    def cloud_common(q: argparse.ArgumentParser, outputs: bool = True) -> None:
        if outputs:
            _outputs_arg(q)
        q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the Azure SDKs' own messages (credential chain, HTTP) on errors")

    parser.add_argument("--debug", action="store_true", help="cloud commands: show the Azure SDKs' own messages")
    p = sub.add_parser("logs", help="cloud: a run's (or the inference app's) console log, live or from Log Analytics")
    p.add_argument("run_id", nargs="?", metavar="RUN_ID", help="run id (or a job execution name)")
    p.add_argument("--app", action="store_true", help="the inference app's log instead of a run's")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming; wait while the run is queued or starting")
    p.add_argument("--since", metavar="DURATION", help="history from Log Analytics for the last DURATION (30m, 1h, 2d)")
    p.add_argument("--tail", type=int, default=100, metavar="N", help="lines of the live log to start with (default 100)")
    cloud_common(p)

    p = sub.add_parser("secrets", help="cloud: the stack's Key Vault secrets (values are never printed)")
    sec = p.add_subparsers(dest="secrets_action", metavar="ACTION", required=True)
    q = sec.add_parser("set", help="store a new version of a secret (HF_TOKEN -> hf-token)")
    q.add_argument("name", metavar="NAME", help="secret name (hf-token, inference-api-keys, or HF_TOKEN)")
    src = q.add_mutually_exclusive_group()
    src.add_argument("--from-env", metavar="VAR", help="read the value from environment variable VAR")
    src.add_argument("--stdin", action="store_true", help="read the value from standard input")
    cloud_common(q)
    q = sec.add_parser("list", help="secret names and when they changed")
    q.add_argument("--json", action="store_true", help="print JSON")
    cloud_common(q)
    q = sec.add_parser("rm", help="delete a secret (soft delete where the vault keeps deleted secrets)")
    q.add_argument("name", metavar="NAME", help="secret name")
    cloud_common(q)

    p = sub.add_parser("endpoint", help="cloud: the inference URL, /readyz and one authenticated completion (verdict)")
    p.add_argument("--api-key", metavar="KEY", help="API key (default: $LORASTACK_API_KEY, else the stack's Key Vault)")
    p.add_argument("--model", metavar="NAME@vN", help="adapter to call (default: the first one the app lists)")
    p.add_argument("--wait", type=float, default=600, metavar="SECONDS",
                   help="how long to wait for /readyz through a scale-from-zero start (default 600)")
    cloud_common(p)

    p = sub.add_parser("restart", help="cloud: roll a new revision of the inference app (reloads image and secrets)")
    p.add_argument("--suffix", metavar="SUFFIX", help="revision suffix (default: r<UTC timestamp>)")
    cloud_common(p)

    p = sub.add_parser("export", help="write other tools' config files from the stack outputs")
    p.add_argument("format", choices=["aitk"], help="aitk: the AI Toolkit's infra/finetuning.config.json and "
                   "infra/inference.config.json")
    p.add_argument("--out", metavar="DIR", default=".", help="folder to write infra/ into (default: .)")
    cloud_common(p)

    p = sub.add_parser("preflight", help="cloud: check a subscription and region before `pulumi up` (one table)")
    _stack_args(p, subscription=True)
    p.add_argument("--json", action="store_true", help="print JSON")
    cloud_common(p, outputs=False)

    p = sub.add_parser("store", help="cloud: operations on the stack's storage account")
    st = p.add_subparsers(dest="store_action", metavar="ACTION", required=True)
    q = st.add_parser("rotate-key", help="rotate the storage key without breaking a mount (two steps around pulumi up)")
    _stack_args(q, subscription=True)
    q.add_argument("--finish", action="store_true", help="after `pulumi up`: regenerate the previous key")
    cloud_common(q, outputs=False)
    # scale (issue 12): more processes for `train`, the engine for `serve` and `finetune`.
    sub.choices["train"].add_argument(
        "--nproc",
        metavar="N",
        help="data-parallel processes in this replica, under torchrun: a number, or 'auto' = one per visible GPU "
        "(default: $LORASTACK_NPROC, else auto)",
    )
    sub.choices["serve"].add_argument(
        "--engine",
        choices=["builtin", "vllm"],
        help="generation engine: builtin (CPU, tests) or vllm (GPU; needs vLLM installed) "
        "(default: $LORASTACK_ENGINE, else builtin)",
    )
    sub.choices["finetune"].add_argument(
        "--engine",
        choices=["aca", "aml"],
        help="cloud: train as the ACA job (default) or as an Azure ML command job / sweep (a spec with sweep:) "
        "(default: $LORASTACK_TRAIN_ENGINE, else aca)",
    )
    sub.choices["finetune"].add_argument("--nodes", type=int, metavar="N", help="--engine aml: nodes (default 1)")
    sub.choices["finetune"].add_argument(
        "--gpus-per-node", type=int, metavar="N", help="--engine aml: GPUs (processes) per node (default 1)"
    )
    p = sub.add_parser("aml", help="Azure ML sweep steps (run by Azure ML inside the trainer image)")
    aml_sub = p.add_subparsers(dest="aml_command", metavar="STEP", required=True)
    q = aml_sub.add_parser("trial", help="train one sweep trial into its own output folder")
    q.add_argument("--store", required=True, metavar="DIR", help="the shared store (read-only)")
    q.add_argument("--run", required=True, metavar="RUN_ID", help="the prepared run being swept")
    q.add_argument("--out", required=True, metavar="DIR", help="this trial's output folder")
    q.add_argument("--learning-rate", type=float, metavar="X")
    q.add_argument("--lora-r", type=int, metavar="N")
    q.add_argument("--epochs", type=float, metavar="N")
    q = aml_sub.add_parser("publish-best", help="publish the best trial's adapter to the shared store")
    q.add_argument("--trial", required=True, metavar="DIR", help="the best trial's output folder")
    q.add_argument("--store", required=True, metavar="DIR", help="the shared store (read-write)")
    q.add_argument("--run", required=True, metavar="RUN_ID", help="the prepared run that was swept")
    return parser


def _lifecycle_parsers(sub: argparse._SubParsersAction) -> None:
    """``eval``, ``adapters`` and ``runs`` (lifecycle; the cloud variants take --outputs)."""
    p = sub.add_parser("eval", help="score an adapter against the base (or another version) on held-out data")
    p.add_argument("adapter", metavar="ADAPTER[@vN]", help="adapter name (its LATEST) or name@vN")
    p.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="chat JSONL to score (default: the run's validation data); repeatable")
    p.add_argument("--against", default="base", metavar="base|ADAPTER@vN",
                   help="what to compare with: the base model (default) or another version on the same base")
    p.add_argument("--prompts", metavar="FILE", help="chat JSONL prompts to generate for (default: the data's)")
    p.add_argument("--samples", type=int, default=8, metavar="N", help="generations side by side (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="per generation (default 64)")
    _store_arg(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--verbose", action="store_true", help="also print the libraries' own logs")

    p = sub.add_parser("adapters", help="adapter versions: list, show, promote, rollback, delete, pull")
    actions = p.add_subparsers(dest="adapters_command", metavar="ACTION", required=True)
    q = actions.add_parser("list", help="every version of every adapter; * marks LATEST (what is served)")
    q.add_argument("name", nargs="?", metavar="NAME", help="only this adapter")
    q = actions.add_parser("show", help="one version: manifest, metrics, promotion verdict, eval, history")
    q.add_argument("ref", metavar="ADAPTER[@vN]")
    q = actions.add_parser("promote", help="point LATEST at a version (the server follows)")
    q.add_argument("ref", metavar="ADAPTER@vN")
    q.add_argument("--reason", help="recorded in promotions.json")
    q = actions.add_parser("rollback", help="move LATEST back to the version promoted before it")
    q.add_argument("name", metavar="ADAPTER")
    q.add_argument("--reason", help="recorded in promotions.json")
    q = actions.add_parser("delete", help="delete a version (never the LATEST one unless --force)")
    q.add_argument("ref", metavar="ADAPTER@vN")
    q.add_argument("--force", action="store_true", help="also delete the LATEST version (LATEST rolls back)")
    q = actions.add_parser("pull", help="copy a version to a directory, or into another store")
    q.add_argument("ref", metavar="ADAPTER[@vN]")
    dest = q.add_mutually_exclusive_group(required=True)
    dest.add_argument("--to", metavar="DIR", help="a new directory (PEFT files: load with peft or vLLM)")
    dest.add_argument("--to-store", metavar="DIR", help="another store (published there as a version)")
    q.add_argument("--promote", action="store_true", help="with --to-store: make it LATEST there")
    for q in actions.choices.values():
        _store_arg(q)
        _outputs_arg(q)
        if q.prog.split()[-1] in ("list", "show"):
            q.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("runs", help="training runs on a store: list, show, rm")
    actions = p.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    q = actions.add_parser("list", help="every run: phase, step, loss, attempts, adapter")
    q = actions.add_parser("show", help="one run: status, checkpoints, who is training it")
    q.add_argument("run_id", metavar="RUN_ID")
    q = actions.add_parser("rm", help="delete a run directory (refused while a trainer holds it)")
    q.add_argument("run_id", metavar="RUN_ID")
    q.add_argument("--force", action="store_true", help="even if its lock looks held")
    for q in actions.choices.values():
        _store_arg(q)
        _outputs_arg(q)
        if q.prog.split()[-1] in ("list", "show"):
            q.add_argument("--json", action="store_true", help="print JSON")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from lorastack import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help()
        return 2
    key = "stack-new" if args.command == "stack" else args.command
    module_name, func_name = HANDLERS[key].split(":")
    try:
        handler = getattr(importlib.import_module(module_name), func_name)
    except ModuleNotFoundError as exc:
        extra = {"validate": "train", "finetune": "train", "train": "train", "serve": "serve", "demo": "all", "status": "cloud", "eval": "train"}.get(key, "infra")
        print(
            f"lorastack {args.command}: missing dependency {exc.name!r}; install it with "
            f"`pip install 'lorastack[{extra}]'`",
            file=sys.stderr,
        )
        return 2
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
