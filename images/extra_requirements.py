"""Print the requirements of lorastack extras from pyproject.toml, one per line, for the image's dependency layers.

    python extra_requirements.py PYPROJECT EXTRA [EXTRA ...] [--with-base] [--without EXTRA ...]

The images install dependencies from pyproject.toml alone (before the sources are copied), so a change in src/
rebuilds only the small layer that installs the lorastack wheel, and the `ml` layer (transformers, peft,
bitsandbytes, ...) is built once in the shared base stage for both images. Self-references (`lorastack[ml]`) are
expanded; `--without ml` leaves out what an earlier layer installed. Standard library only (tomllib: Python 3.11+,
which the PyTorch base image has).
"""

from __future__ import annotations

import argparse
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 hosts
    sys.exit("extra_requirements.py needs Python 3.11+ (tomllib)")

_SELF_RE = re.compile(r"^\s*(?P<name>[A-Za-z0-9_.-]+)\s*\[(?P<extras>[^\]]+)\]\s*$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: dict, extras: list[str], with_base: bool = False, without: list[str] = ()) -> list[str]:
    """Requirement strings of ``extras`` (self-references expanded, order kept, duplicates and ``without`` removed)."""
    name = _norm(project["name"])
    optional = project.get("optional-dependencies", {})

    def expand(extra: str, seen: set[str]) -> list[str]:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml: no optional-dependencies extra named {extra!r}")
        if extra in seen:
            return []
        seen.add(extra)
        out = []
        for req in optional[extra]:
            m = _SELF_RE.match(req)
            if m and _norm(m["name"]) == name:
                for sub in m["extras"].split(","):
                    out += expand(sub.strip(), seen)
            else:
                out.append(req)
        return out

    skip: set[str] = set()
    for extra in without:
        skip.update(expand(extra, set()))
    out = list(project.get("dependencies", [])) if with_base else []
    for extra in extras:
        out += expand(extra, set())
    return [r for i, r in enumerate(out) if r not in skip and r not in out[:i]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject")
    parser.add_argument("extras", nargs="+")
    parser.add_argument("--with-base", action="store_true", help="include [project] dependencies")
    parser.add_argument("--without", action="append", default=[], metavar="EXTRA")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    print("\n".join(requirements(project, args.extras, args.with_base, args.without)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
