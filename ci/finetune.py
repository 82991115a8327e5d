"""The fine-tune workflow's logic: which specs a change touches, the PR summary, the target stack, the eval report.

    python -m ci.finetune select  --changed FILE [--merge]          # changed paths, one per line -> specs=[...]
    python -m ci.finetune summary SPEC... [--stacks-dir stacks]     # markdown for the PR comment; exit 1 if invalid
    python -m ci.finetune target  SPEC                              # stack=, adapter=, promote= for the merge job
    python -m ci.finetune versions --before A.json --after B.json   # new=name@vN, previous=name@vM|""
    python -m ci.finetune report  --adapter NAME@vN --vs-base E.json [--vs-latest E.json] [--rule RULE]

Choice of specs: a changed YAML under ``jobs/`` that is a run spec (a mapping with ``training_file``), and every spec
whose ``training_file`` / ``validation_file`` is a changed file (data changed -> the spec that uses it). Deleted specs
are not chosen. On merge, specs matching ``validate_only`` in ``ci/finetune.yaml`` (the examples) are left out.
Data too large for git is referenced, not committed: a ``training_file`` with a scheme (``share://datasets/<sha256>
.jsonl``, ``https://...``) is reported as "referenced" and validated by the job that reads it, never fetched here.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ci.stacks import stack_names

HERE = Path(__file__).resolve().parent
CONFIG_FILE = HERE / "finetune.yaml"
PRICES_FILE = HERE / "gpu_prices.yaml"
JOBS_DIR = "jobs"
DATA_KEYS = ("training_file", "validation_file")
PROMOTE_RULES = ("always", "if_better", "never")
_URI_RE = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
_SIZE_RE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([MB])(?![a-z])", re.IGNORECASE)


class FinetuneError(ValueError):
    """Bad input to a fine-tune step; the message names the file or key and what to do."""


# -- configuration ----------------------------------------------------------------------------------------------------
def load_yaml(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise FinetuneError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(doc, dict):
        raise FinetuneError(f"{path}: expected a mapping")
    return doc


def _glob_match(path: str, pattern: str) -> bool:
    # fnmatch's * crosses "/", so "jobs/examples/**" and "jobs/examples/*" both cover the folder's tree.
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern.rstrip("*").rstrip("/") + "/*")


# -- which specs a change touches -------------------------------------------------------------------------------------
def is_uri(value: Any) -> bool:
    return isinstance(value, str) and bool(_URI_RE.match(value))


def read_spec_mapping(path: Path) -> dict[str, Any] | None:
    """The raw mapping of a run spec, or None if the file is not one (no ``training_file`` key, not YAML)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return doc if isinstance(doc, dict) and "training_file" in doc else None


def spec_data_paths(spec_rel: str, doc: dict[str, Any]) -> list[str]:
    """Repo-relative paths of the data files a spec names (URIs left out), resolved as the spec loader does."""
    out = []
    base = Path(spec_rel).parent
    for key in DATA_KEYS:
        value = doc.get(key)
        if isinstance(value, str) and value and not is_uri(value):
            out.append(os.path.normpath((base / value).as_posix()).replace(os.sep, "/"))
    return out


def all_specs(repo: Path, jobs_dir: str = JOBS_DIR) -> dict[str, dict[str, Any]]:
    """Every run spec under ``jobs_dir`` (repo-relative path -> raw mapping)."""
    root = Path(repo) / jobs_dir
    specs = {}
    for path in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]) if root.is_dir() else []:
        doc = read_spec_mapping(path)
        if doc is not None:
            specs[path.relative_to(repo).as_posix()] = doc
    return specs


def select_specs(
    changed: list[str], repo: Path, merge: bool = False, config: dict[str, Any] | None = None
) -> list[str]:
    """The specs a change touches (sorted, repo-relative): changed specs, and specs whose data files changed.

    ``merge`` leaves out the ``validate_only`` globs of the config (validated on PRs, never trained by a merge).
    """
    config = load_yaml(CONFIG_FILE) if config is None else config
    changed_set = {os.path.normpath(c.strip()).replace(os.sep, "/") for c in changed if c.strip()}
    chosen = set()
    for rel, doc in all_specs(repo).items():
        if rel in changed_set or changed_set.intersection(spec_data_paths(rel, doc)):
            chosen.add(rel)
    if merge:
        skip = config.get("validate_only") or []
        chosen = {s for s in chosen if not any(_glob_match(s, g) for g in skip)}
    return sorted(chosen)


# -- target stack and promotion rule ----------------------------------------------------------------------------------
@dataclass
class Target:
    spec: str
    adapter: str
    stack: str
    promote: str
    gpu_profile: str | None = None


def _stack_doc(stacks_dir: Path, stack: str) -> dict[str, Any]:
    if stack not in stack_names(stacks_dir):
        raise FinetuneError(f"target stack {stack!r} has no stacks/Pulumi.{stack}.yaml: name an existing stack")
    return load_yaml(Path(stacks_dir) / f"Pulumi.{stack}.yaml")


def target_of(spec_rel: str, doc: dict[str, Any], stacks_dir: Path, config: dict[str, Any] | None = None) -> Target:
    """Where a merged spec trains (spec ``stack:`` > config glob > ``default_stack``) and its promotion rule."""
    config = load_yaml(CONFIG_FILE) if config is None else config
    stack = doc.get("stack")
    if not stack:
        for pattern, name in (config.get("stacks") or {}).items():
            if _glob_match(spec_rel, pattern):
                stack = name
                break
    stack = stack or config.get("default_stack") or "dev"
    training = (_stack_doc(stacks_dir, stack).get("config") or {}).get("lorastack:training") or {}
    rule = doc.get("promote") or "if_better"
    if rule not in PROMOTE_RULES:
        raise FinetuneError(f"{spec_rel}: promote: must be one of {', '.join(PROMOTE_RULES)}, got {rule!r}")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise FinetuneError(f"{spec_rel}: name: the adapter name is missing")
    return Target(spec_rel, name, str(stack), rule, training.get("gpuProfile"))


def matrix_entry(t: Target) -> dict[str, str]:
    """One entry of the train job's matrix; the job runs in the stack's deploy environment (its OIDC subject)."""
    from ci.stacks import deploy_environment

    return {"spec": t.spec, "adapter": t.adapter, "stack": t.stack, "promote": t.promote,
            "environment": deploy_environment(t.stack)}


# -- PR summary: data, tokens, estimated GPU time and cost ------------------------------------------------------------
def parameter_count(base_model: str, prices: dict[str, Any]) -> float | None:
    """N for the FLOPs model: the price file's table, else the size in the model's name (``-135M``, ``-8B``)."""
    table = prices.get("models") or {}
    if base_model in table:
        return float(table[base_model])
    m = _SIZE_RE.search(base_model.rsplit("/", 1)[-1])
    if not m:
        return None
    return float(m.group(1)) * (1e6 if m.group(2).upper() == "M" else 1e9)


def estimate_tokens(path: Path) -> tuple[int, int]:
    """(examples, approximate tokens) of a chat JSONL without a tokenizer: characters / 4, a common rule of thumb."""
    examples = chars = 0
    with open(path, encoding="utf-8-sig") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                messages = json.loads(line).get("messages") or []
            except (json.JSONDecodeError, AttributeError):
                continue
            examples += 1
            chars += sum(len(str(m.get("content") or "")) + 8 for m in messages if isinstance(m, dict))
    return examples, math.ceil(chars / 4)


@dataclass
class Estimate:
    tokens_per_epoch: int
    trained_tokens: int
    gpu_hours: float
    cost: float
    capped_by_budget: bool
    profile: str


def estimate_cost(
    tokens_per_epoch: int,
    epochs: float,
    max_steps: int,
    tokens_per_step: int,
    params: float,
    profile: str,
    prices: dict[str, Any],
    time_budget_s: int | None = None,
) -> Estimate:
    """GPU hours and cost: tokens x 6N FLOPs at the profile's peak x MFU, plus startup, capped by the time budget."""
    row = (prices.get("profiles") or {}).get(profile)
    if row is None:
        raise FinetuneError(f"GPU profile {profile!r} has no row in ci/gpu_prices.yaml profiles: add its peak and rate")
    trained = max_steps * tokens_per_step if max_steps and max_steps > 0 else math.ceil(tokens_per_epoch * epochs)
    seconds = trained * 6 * params / (float(row["peak_tflops"]) * 1e12 * float(prices.get("mfu", 0.3)))
    seconds += float(prices.get("startup_minutes", 0)) * 60
    capped = bool(time_budget_s and seconds > time_budget_s)
    if capped:
        seconds = float(time_budget_s)
    hours = seconds / 3600
    return Estimate(tokens_per_epoch, trained, hours, hours * float(row["usd_per_hour"]), capped, profile)


@dataclass
class SpecSummary:
    spec: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def _fmt_hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def summarize_spec(spec_rel: str, repo: Path, stacks_dir: Path, prices: dict[str, Any],
                   config: dict[str, Any] | None = None, tokenizer: Any = None) -> SpecSummary:
    """Validate one spec and its data offline (the real spec loader and data checks) and describe the run."""
    from lorastack.data import validate_file
    from lorastack.spec import SpecError, load_spec

    path = Path(repo) / spec_rel
    doc = read_spec_mapping(path) or {}
    referenced = {k: doc[k] for k in DATA_KEYS if is_uri(doc.get(k))}
    out = SpecSummary(spec_rel, ok=True)
    if referenced:
        # The spec loader checks local files only; referenced data is checked by the job that reads it.
        out.lines += [f"- data `{k}`: referenced `{v}`, validated by the training job" for k, v in referenced.items()]
        out.lines.append("- no example, token or cost figures: referenced data is not read offline")
        try:
            target = target_of(spec_rel, doc, stacks_dir, config)
        except FinetuneError as exc:
            return SpecSummary(spec_rel, False, [str(exc)], out.lines)
        out.lines.insert(0, f"- adapter `{target.adapter}` on stack `{target.stack}` (promote: `{target.promote}`)")
        return out
    try:
        spec = load_spec(path)
    except SpecError as exc:
        return SpecSummary(spec_rel, False, list(exc.problems))
    try:
        target = target_of(spec_rel, doc, stacks_dir, config)
    except FinetuneError as exc:
        return SpecSummary(spec_rel, False, [str(exc)])
    out.lines.append(
        f"- adapter `{spec.name}` on `{spec.base_model}` (revision `{spec.base_revision}`), "
        f"stack `{target.stack}`, promote: `{target.promote}`"
    )
    tokens_per_epoch = 0
    counted = "tokens"
    for key, file in spec.data_files().items():
        purpose = "train" if key == "training" else "validation"
        report = validate_file(file, tokenizer, spec.max_seq_len, purpose)
        if not report.ok:
            out.ok = False
            out.problems += [str(p) for p in report.errors]
        if tokenizer is not None and report.tokens.n:
            tokens = report.tokens.total
        else:
            _, tokens = estimate_tokens(file)
            counted = "tokens (≈ characters / 4; no tokenizer offline)"
        if purpose == "train":
            tokens_per_epoch = tokens
        rel = os.path.relpath(file, repo)
        out.lines.append(
            f"- {key} data `{rel}`: {report.examples} examples ({report.trainable_examples} trainable), "
            f"{tokens:,} {counted}, {report.error_count} errors, {report.warning_count} warnings"
        )
    params = parameter_count(spec.base_model, prices)
    if params is None:
        out.lines.append(f"- cost: unknown size of `{spec.base_model}`: add it to ci/gpu_prices.yaml models")
    elif target.gpu_profile:
        t = spec.training
        est = estimate_cost(
            tokens_per_epoch,
            t.epochs,
            t.max_steps,
            t.per_device_batch_size * t.gradient_accumulation_steps * spec.max_seq_len,
            params,
            target.gpu_profile,
            prices,
            spec.time_budget,
        )
        row = prices["profiles"][target.gpu_profile]
        cap = " (the time budget stops it there: it checkpoints and can resume)" if est.capped_by_budget else ""
        out.lines.append(
            f"- estimate on `{target.gpu_profile}` ({row['gpu']}): {est.trained_tokens:,} trained tokens, "
            f"about {_fmt_hours(est.gpu_hours)} of GPU time, about {prices.get('currency', 'USD')} {est.cost:.2f}{cap}"
        )
    return out


def summary_markdown(summaries: list[SpecSummary], prices: dict[str, Any]) -> str:
    """The PR comment: one section per spec, then where the estimate comes from."""
    lines = ["## Fine-tune plan", ""]
    if not summaries:
        lines.append("No run spec under `jobs/` is touched by this change.")
    for s in summaries:
        lines += [f"### `{s.spec}` {'✅' if s.ok else '❌'}", "", *s.lines]
        if s.problems:
            lines += ["", "Problems:", *[f"- {p}" for p in s.problems]]
        lines.append("")
    lines += [
        (f"_Estimates: 6·N FLOPs per trained token at {float(prices.get('mfu', 0.3)):.0%} of the GPU's peak, plus "
        f"{prices.get('startup_minutes', 0)} min of start-up; rates from ci/gpu_prices.yaml "
        f"(checked {prices.get('checked', '?')}). Merging trains each spec on its stack._"),
    ]
    return "\n".join(lines) + "\n"


# -- after the run: which version is new, the eval table, the promotion verdict --------------------------------------
def _version_number(v: str) -> int:
    m = re.fullmatch(r"v(\d+)", str(v).rsplit("@", 1)[-1])
    return int(m.group(1)) if m else -1


def parse_versions(doc: Any, adapter: str) -> tuple[list[str], str | None]:
    """(versions, LATEST) of ``adapter`` from ``lorastack adapters list|show --json`` output, read tolerantly.

    Accepted shapes: ``{"latest": "v2", "versions": ["v1", {"version": "v2"}]}``, the same under
    ``{"adapters": {name: ...}}`` or ``[{"name": ..., ...}]``, or a list of ``{"version", "latest": bool}`` rows.
    """
    if isinstance(doc, dict) and "adapters" in doc:
        doc = doc["adapters"]
    if isinstance(doc, dict) and adapter in doc:
        doc = doc[adapter]
    if isinstance(doc, list) and doc and all(isinstance(x, dict) and "name" in x for x in doc):
        doc = next((x for x in doc if x["name"] == adapter), {})
    versions: list[str] = []
    latest = None
    rows = doc.get("versions", []) if isinstance(doc, dict) else doc if isinstance(doc, list) else []
    for row in rows:
        v = row.get("version") if isinstance(row, dict) else row
        if isinstance(v, str) and _version_number(v) >= 0:
            versions.append(v.rsplit("@", 1)[-1])
            if isinstance(row, dict) and (row.get("latest") or row.get("promoted") is True):
                latest = v.rsplit("@", 1)[-1]
    if isinstance(doc, dict):
        value = doc.get("latest") or doc.get("LATEST")
        if isinstance(value, str) and value:
            latest = value.rsplit("@", 1)[-1]
    return sorted(set(versions), key=_version_number), latest


def new_version(before: Any, after: Any, adapter: str) -> tuple[str, str | None]:
    """(``name@vN`` the run published, ``name@vM`` that was LATEST before it or None)."""
    old_versions, old_latest = parse_versions(before, adapter)
    new_versions, _ = parse_versions(after, adapter)
    added = [v for v in new_versions if v not in old_versions]
    if not added:
        raise FinetuneError(f"the run published no new version of {adapter} (versions: {new_versions or 'none'})")
    return f"{adapter}@{added[-1]}", (f"{adapter}@{old_latest}" if old_latest else None)


METRICS = (("loss", "{:.4f}", True), ("perplexity", "{:.2f}", True), ("token_accuracy", "{:.1%}", False),
           ("chrf", "{:.1f}", False), ("rouge_l", "{:.3f}", False), ("examples", "{:d}", None), ("tokens", "{:,}", None))


def _metric_rows(evals: list[dict[str, Any]], adapter: str) -> tuple[list[str], list[str]]:
    columns: list[str] = []
    for e in evals:
        columns.append(e["against"])
    columns.append(adapter)
    metrics: dict[str, dict[str, Any]] = {}
    for e in evals:
        for label, values in (e.get("metrics") or {}).items():
            metrics.setdefault(label, values)
    rows = []
    for key, fmt, _lower in METRICS:
        if not any(key in (metrics.get(c) or {}) for c in columns):
            continue
        cells = []
        for c in columns:
            v = (metrics.get(c) or {}).get(key)
            cells.append("–" if v is None else fmt.format(v))
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    return columns, rows


def decide(rule: str, adapter: str, vs_base: dict[str, Any], vs_latest: dict[str, Any] | None) -> tuple[bool, str]:
    """Whether ``adapter`` should become LATEST under ``rule``; ``if_better`` compares eval loss on the same data
    with the previous LATEST (or the base when there is none)."""
    if rule == "never":
        return False, "promote: never (promote by hand with `lorastack adapters promote`)"
    if rule == "always":
        return True, "promote: always"
    baseline = vs_latest or vs_base
    label = baseline["against"]
    try:
        ours = float(baseline["metrics"][adapter]["loss"])
        theirs = float(baseline["metrics"][label]["loss"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FinetuneError(f"eval result for {adapter} against {label} has no loss for both: {exc}") from exc
    if ours < theirs:
        return True, f"if_better: eval loss {ours:.4f} < {theirs:.4f} ({label})"
    return False, f"if_better: eval loss {ours:.4f} is not below {theirs:.4f} ({label}); {label} stays LATEST"


def report_markdown(adapter: str, vs_base: dict[str, Any], vs_latest: dict[str, Any] | None,
                    promote: bool, reason: str) -> str:
    """The job summary: one table (base, previous LATEST, the new version), the verdict, a few samples."""
    evals = [vs_base] + ([vs_latest] if vs_latest else [])
    columns, rows = _metric_rows(evals, adapter)
    lines = [f"## Eval of `{adapter}`", "", "| metric | " + " | ".join(f"`{c}`" for c in columns) + " |",
             "|---|" + "---|" * len(columns), *rows, ""]
    lines.append(f"**{'Promoted' if promote else 'Not promoted'}**: {reason}")
    samples = (vs_base.get("samples") or [])[:3]
    if samples:
        lines += ["", "<details><summary>Samples</summary>", ""]
        for s in samples:
            prompt = next((m.get("content") for m in reversed(s.get("prompt") or []) if m.get("role") == "user"), "")
            lines += [f"- **prompt**: {prompt}", f"  - reference: {s.get('reference', '')}",
                      f"  - base: {s.get(vs_base['against'], '')}", f"  - `{adapter}`: {s.get(adapter, '')}"]
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


# -- CLI --------------------------------------------------------------------------------------------------------------
def _write_outputs(path: Path | None, pairs: dict[str, str]) -> None:
    text = "".join(f"{k}={v}\n" for k, v in pairs.items())
    sys.stdout.write(text)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ci.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--stacks-dir", type=Path, default=None, help="default: <repo>/stacks")
    parser.add_argument("--github-output", type=Path, default=os.environ.get("GITHUB_OUTPUT") or None)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("select", help="specs touched by a change")
    p.add_argument("--changed", type=Path, required=True, help="file with the changed paths, one per line")
    p.add_argument("--merge", action="store_true", help="leave out validate_only specs (the merge run)")
    p.add_argument("--with-targets", action="store_true",
                   help="matrix entries {spec, adapter, stack, promote, environment} instead of paths")
    p = sub.add_parser("summary", help="PR summary markdown")
    p.add_argument("specs", nargs="*")
    p.add_argument("--out", type=Path, help="write the markdown here (default: stdout)")
    p.add_argument("--tokenizer", action="store_true", help="count tokens with each base model's tokenizer (hub)")
    p = sub.add_parser("target", help="stack, adapter and promotion rule of a spec")
    p.add_argument("spec")
    p = sub.add_parser("versions", help="which version a run published")
    p.add_argument("--adapter", required=True)
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p = sub.add_parser("report", help="eval table and promotion verdict")
    p.add_argument("--adapter", required=True, metavar="NAME@vN")
    p.add_argument("--vs-base", type=Path, required=True)
    p.add_argument("--vs-latest", type=Path)
    p.add_argument("--rule", default="if_better", choices=PROMOTE_RULES)
    p.add_argument("--out", type=Path, help="append the markdown here (e.g. $GITHUB_STEP_SUMMARY)")
    args = parser.parse_args(argv)
    repo = args.repo
    stacks_dir = args.stacks_dir or repo / "stacks"
    try:
        if args.command == "select":
            changed = args.changed.read_text(encoding="utf-8").splitlines()
            specs: list[Any] = select_specs(changed, repo, merge=args.merge)
            if args.with_targets:
                specs = [matrix_entry(target_of(s, read_spec_mapping(repo / s) or {}, stacks_dir)) for s in specs]
            _write_outputs(args.github_output, {"specs": json.dumps(specs, separators=(",", ":")),
                                                "count": str(len(specs))})
            return 0
        if args.command == "summary":
            prices = load_yaml(PRICES_FILE)
            summaries = []
            for spec in args.specs:
                tokenizer = None
                if args.tokenizer:
                    tokenizer = _load_tokenizer(repo / spec)
                summaries.append(summarize_spec(spec, repo, stacks_dir, prices, tokenizer=tokenizer))
            text = summary_markdown(summaries, prices)
            if args.out:
                args.out.write_text(text, encoding="utf-8")
            else:
                sys.stdout.write(text)
            return 0 if all(s.ok for s in summaries) else 1
        if args.command == "target":
            doc = read_spec_mapping(repo / args.spec)
            if doc is None:
                raise FinetuneError(f"{args.spec}: not a run spec (no training_file key)")
            t = target_of(args.spec, doc, stacks_dir)
            _write_outputs(args.github_output, {"stack": t.stack, "adapter": t.adapter, "promote": t.promote})
            return 0
        if args.command == "versions":
            before = json.loads(args.before.read_text(encoding="utf-8") or "null")
            after = json.loads(args.after.read_text(encoding="utf-8") or "null")
            new, previous = new_version(before, after, args.adapter)
            _write_outputs(args.github_output, {"new": new, "previous": previous or ""})
            return 0
        if args.command == "report":
            vs_base = json.loads(args.vs_base.read_text(encoding="utf-8"))
            vs_latest = json.loads(args.vs_latest.read_text(encoding="utf-8")) if args.vs_latest else None
            promote, reason = decide(args.rule, args.adapter, vs_base, vs_latest)
            text = report_markdown(args.adapter, vs_base, vs_latest, promote, reason)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as fh:
                    fh.write(text)
            print(text)
            _write_outputs(args.github_output, {"promote": "true" if promote else "false"})
            return 0
    except (FinetuneError, OSError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 2


def _load_tokenizer(spec_path: Path) -> Any:
    """The base model's tokenizer (downloaded from the hub on a runner that can reach it)."""
    from transformers import AutoTokenizer

    from lorastack.spec import load_spec

    spec = load_spec(spec_path)
    return AutoTokenizer.from_pretrained(spec.base_model, revision=spec.base_revision)


if __name__ == "__main__":
    sys.exit(main())
