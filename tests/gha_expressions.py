"""A small evaluator for the GitHub Actions expressions the workflows use in ``if:`` (tests only), and a job-graph
simulator on top of it: which jobs of a workflow run, are skipped or fail for an event, given each job's outcome.

Supported: literals ('str', numbers, true/false/null), context paths (``needs.up-dev.result``, ``inputs.stack``),
``! == != && || ( )``, and the functions cancelled(), success(), failure(), always(), contains(), fromJSON(),
startsWith(). Anything else raises, so a workflow change the evaluator cannot read fails the test loudly.
Semantics follow GitHub's: a job's ``if`` without a status function is ``success() && (if)``; a job whose ``needs``
did not all succeed is skipped unless its ``if`` says otherwise; ``&&``/``||`` return operands, not booleans.
"""

from __future__ import annotations

import json
import re
from typing import Any

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>==|!=|&&|\|\||[!(),])"
    r"|(?P<name>[A-Za-z_][\w-]*(?:\.[A-Za-z_*][\w-]*|\[\d+\])*))"
)
STATUS_FUNCTIONS = ("success(", "failure(", "always(", "cancelled(")


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read expression at {text[pos:]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _truthy(v: Any) -> bool:
    return v not in (None, False, 0, "", "0") if not isinstance(v, (list, dict)) else True


def _eq(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


class _Parser:
    def __init__(self, text: str, ctx: dict[str, Any], status: dict[str, bool]):
        self.toks = _tokens(text)
        self.i = 0
        self.ctx = ctx
        self.status = status

    def peek(self) -> tuple[str, str] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None or (value is not None and tok[1] != value):
            raise ValueError(f"expected {value!r}, got {tok}")
        self.i += 1
        return tok

    def parse(self) -> Any:
        v = self.or_()
        if self.peek() is not None:
            raise ValueError(f"trailing tokens {self.toks[self.i:]}")
        return v

    def or_(self) -> Any:
        v = self.and_()
        while self.peek() == ("op", "||"):
            self.take()
            rhs = self.and_()
            v = v if _truthy(v) else rhs
        return v

    def and_(self) -> Any:
        v = self.cmp()
        while self.peek() == ("op", "&&"):
            self.take()
            rhs = self.cmp()
            v = rhs if _truthy(v) else v
        return v

    def cmp(self) -> Any:
        v = self.unary()
        while self.peek() in (("op", "=="), ("op", "!=")):
            op = self.take()[1]
            rhs = self.unary()
            v = _eq(v, rhs) if op == "==" else not _eq(v, rhs)
        return v

    def unary(self) -> Any:
        if self.peek() == ("op", "!"):
            self.take()
            return not _truthy(self.unary())
        return self.atom()

    def atom(self) -> Any:
        kind, value = self.take()
        if kind == "str":
            return value[1:-1].replace("''", "'")
        if kind == "num":
            return float(value) if "." in value else int(value)
        if kind == "op" and value == "(":
            v = self.or_()
            self.take(")")
            return v
        if kind != "name":
            raise ValueError(f"unexpected {value!r}")
        if value in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[value]
        if self.peek() == ("op", "("):
            self.take()
            args = []
            while self.peek() != ("op", ")"):
                args.append(self.or_())
                if self.peek() == ("op", ","):
                    self.take()
            self.take(")")
            return self.call(value, args)
        return self.lookup(value)

    def call(self, name: str, args: list[Any]) -> Any:
        if name in ("success", "failure", "cancelled", "always"):
            return self.status[name]
        if name == "fromJSON":
            return json.loads(args[0])
        if name == "contains":
            hay, needle = args
            if isinstance(hay, list):
                return any(_eq(h, needle) for h in hay)
            return str(needle).lower() in str(hay).lower()
        if name == "startsWith":
            return str(args[0]).lower().startswith(str(args[1]).lower())
        raise ValueError(f"function {name}() is not supported by this evaluator")

    def lookup(self, path: str) -> Any:
        cur: Any = self.ctx
        for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
            if part.startswith("["):
                idx = int(part[1:-1])
                cur = cur[idx] if isinstance(cur, list) and idx < len(cur) else None
            else:
                cur = cur.get(part) if isinstance(cur, dict) else None
        return cur


def evaluate(expr: str, ctx: dict[str, Any], status: dict[str, bool] | None = None) -> Any:
    """Value of an expression (``${{ }}`` optional around it)."""
    text = expr.strip()
    if text.startswith("${{") and text.endswith("}}"):
        text = text[3:-2]
    status = status or {"success": True, "failure": False, "cancelled": False, "always": True}
    return _Parser(text, ctx, status).parse()


def simulate(jobs: dict[str, dict], ctx: dict[str, Any], outcome: dict[str, str] | None = None,
             outputs: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """Result of every job (success / failure / skipped) for one run.

    ``outcome`` gives the result of a job that runs (default success); ``outputs`` the outputs of a job that
    succeeded (what later jobs read as ``needs.<job>.outputs``).
    """
    outcome, outputs = outcome or {}, outputs or {}
    results: dict[str, str] = {}
    pending = dict(jobs)
    while pending:
        ready = [n for n, j in pending.items() if all(d in results for d in _needs(j))]
        if not ready:
            raise ValueError(f"cycle or unknown need among {sorted(pending)}")
        for name in ready:
            job = pending.pop(name)
            needs = {d: {"result": results[d], "outputs": outputs.get(d, {}) if results[d] == "success" else {}}
                     for d in _needs(job)}
            status = {
                "success": all(n["result"] == "success" for n in needs.values()),
                "failure": any(n["result"] == "failure" for n in needs.values()),
                "cancelled": False,
                "always": True,
            }
            cond = str(job.get("if", "true"))
            if not any(f in cond for f in STATUS_FUNCTIONS):
                cond = f"success() && ({cond[3:-2] if cond.strip().startswith('${{') else cond})"
            run = _truthy(evaluate(cond, {**ctx, "needs": needs}, status))
            results[name] = outcome.get(name, "success") if run else "skipped"
    return results


def _needs(job: dict) -> list[str]:
    needs = job.get("needs", [])
    return [needs] if isinstance(needs, str) else list(needs)
