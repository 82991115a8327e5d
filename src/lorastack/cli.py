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
    "validate": "lorastack.data:validate_command",
    "finetune": "lorastack.commands.train:finetune_command",
    "train": "lorastack.commands.train:train_command",
    "status": "lorastack.commands.cloud:status_command",
    "serve": "lorastack.commands.serve:serve_command",
    "demo": "lorastack.demo:demo_command",
    "plan": "provisioning.plan:plan_command",
    "stack-new": "provisioning.selfservice:stack_new_command",
}


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="DIR",
        help="adapter store directory (default: $LORASTACK_STORE or ./.lorastack/store)",
    )


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

    p = sub.add_parser("train", help="run a prepared run from the store (the training image's entrypoint)")
    _store_arg(p)
    p.add_argument(
        "--run",
        metavar="RUN_ID",
        help="run id under <store>/runs/, or 'next' to claim the oldest queued run "
        "(default: $LORASTACK_RUN_ID, else 'next', which is what the Azure job does)",
    )

    p = sub.add_parser("status", help="cloud: a run's status on the Azure store, or every run and adapter")
    p.add_argument("run_id", nargs="?", metavar="RUN_ID", help="run id printed by `lorastack finetune`")
    _outputs_arg(p)
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

    p = sub.add_parser("plan", help="render a stack offline under Pulumi mocks and check the policies")
    p.add_argument("--stack", required=True, metavar="NAME", help="stack name (stacks/Pulumi.<NAME>.yaml)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--project-dir", metavar="DIR", help="directory holding Pulumi.yaml (default: search upwards)")

    p = sub.add_parser("stack", help="self-service stacks")
    stack_sub = p.add_subparsers(dest="stack_command", metavar="ACTION", required=True)
    q = stack_sub.add_parser("new", help="create stacks/Pulumi.<team>.yaml within the platform guardrails")
    q.add_argument("team", metavar="TEAM", help="team name (the stack name)")
    q.add_argument("--location", metavar="REGION", help="Azure region (must be allowed by the guardrails)")
    q.add_argument("--gpu", metavar="PROFILE", help="inference GPU workload profile type")
    q.add_argument("--max-replicas", type=int, metavar="N", help="inference max replicas")
    q.add_argument("--project-dir", metavar="DIR", help="directory holding Pulumi.yaml (default: search upwards)")
    return parser


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
        extra = {"validate": "train", "finetune": "train", "train": "train", "serve": "serve", "demo": "all", "status": "cloud"}.get(key, "infra")
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
