"""Read Dockerfiles and .dockerignore the way Docker does, for tests/test_images.py.

There is no Docker engine on the test machines, so the image tests parse the Dockerfiles and replay
their commands: instructions with line continuations, build stages, ARG/ENV with ``$VAR`` /
``${VAR}`` / ``${VAR:-default}`` substitution, exec (JSON) or shell form for RUN/ENTRYPOINT/CMD, and
.dockerignore's last-match-wins patterns (``*``, ``?``, ``**``, ``!`` exceptions, parent matches).
Only what the lorastack images use is supported; anything else raises, rather than being misread.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR_RE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-+])?(?P<word>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


@dataclass
class Instruction:
    """One Dockerfile instruction: keyword (upper case), its raw argument text and its first line."""

    keyword: str
    text: str
    line: int

    def is_json_form(self) -> bool:
        return self.text.lstrip().startswith("[")

    def json_args(self) -> list[str]:
        """The argv of an exec-form (JSON array) instruction."""
        try:
            value = json.loads(self.text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {self.line}: {self.keyword} is not a valid JSON array: {exc}") from exc
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"line {self.line}: {self.keyword} must be a JSON array of strings")
        return value


@dataclass
class Stage:
    """A build stage: its FROM image (variables substituted), optional name and instructions."""

    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"{self.path}: no stage named {name!r}")

    def chain(self, name: str) -> list[Stage]:
        """The stages a target is built from, outermost first (``FROM base AS trainer`` -> [base, trainer])."""
        names = {s.name for s in self.stages if s.name}
        out = [self.stage(name)]
        while out[0].image in names:
            parent = self.stage(out[0].image)
            if parent in out:
                raise ValueError(f"{self.path}: stage {name!r} inherits from itself")
            out.insert(0, parent)
        return out

    def target(self, name: str) -> Stage:
        """``--target name`` as one stage: the external image it starts from and every inherited instruction."""
        chain = self.chain(name)
        return Stage(
            image=chain[0].image,
            name=name,
            instructions=[ins for stage in chain for ins in stage.instructions],
        )


def substitute(text: str, env: dict[str, str]) -> str:
    """Expand ``$VAR``, ``${VAR}``, ``${VAR:-default}`` and ``${VAR:+alt}`` as Docker does in instructions."""

    def repl(m: re.Match[str]) -> str:
        name = m.group("braced") or m.group("plain")
        value = env.get(name, "")
        op = m.group("op")
        if op is None:
            return value
        word = m.group("word")
        if op in (":-", "-"):
            return value if value else word
        return word if value else ""

    return _VAR_RE.sub(repl, text)


def logical_lines(source: str) -> list[tuple[int, str]]:
    """Join backslash continuations; drop comments and blank lines (also inside continuations)."""
    out: list[tuple[int, str]] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(source.splitlines(), start=1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are removed by Docker
        if not buf:
            start = number
        if raw.rstrip().endswith("\\"):
            buf.append(raw.rstrip()[:-1])
            continue
        buf.append(raw)
        out.append((start, " ".join(part.strip() for part in buf if part.strip())))
        buf = []
    if buf:
        raise ValueError(f"line {start}: the file ends inside a continued instruction")
    return out


def parse_key_values(text: str, line: int, keyword: str) -> list[tuple[str, str]]:
    """``K=V K2="v 2"`` pairs of ENV, ARG and LABEL (quotes removed, no substitution)."""
    pairs = []
    for token in shlex.split(text, posix=True):
        if "=" not in token:
            if keyword == "ARG":
                pairs.append((token, ""))
                continue
            raise ValueError(f"line {line}: {keyword} {text!r}: use the KEY=VALUE form")
        key, _, value = token.partition("=")
        pairs.append((key, value))
    return pairs


def parse(path: str | Path) -> Dockerfile:
    """Parse a Dockerfile into global ARGs and stages (FROM images have build-arg defaults substituted)."""
    path = Path(path)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in logical_lines(path.read_text(encoding="utf-8")):
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            image = substitute(parts[0], global_args)
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image=image, name=name))
            continue
        if not stages:
            if keyword != "ARG":
                raise ValueError(f"{path}:{line}: only ARG may come before the first FROM, not {keyword}")
            global_args.update(parse_key_values(rest, line, keyword))
            continue
        stages[-1].instructions.append(Instruction(keyword, rest, line))
    if not stages:
        raise ValueError(f"{path}: no FROM instruction")
    return Dockerfile(path, global_args, stages)


def stage_env(
    df: Dockerfile, stage: Stage, base_env: dict[str, str], upto: Instruction | None = None
) -> dict[str, str]:
    """The environment a RUN (or the container, if ``upto`` is None) sees in ``stage``: ``base_env``
    (the base image's variables) plus the stage's ARG defaults and ENV values, in order.

    ARGs are visible to RUN but not to the running container, like Docker.
    """
    env = dict(base_env)
    args: dict[str, str] = {}
    for ins in stage.instructions:
        if upto is not None and ins is upto:
            break
        if ins.keyword == "ARG":
            for key, value in parse_key_values(ins.text, ins.line, "ARG"):
                args[key] = (
                    substitute(value, {**df.global_args, **env, **args})
                    if value
                    else df.global_args.get(key, "")
                )
        elif ins.keyword == "ENV":
            # every value of one ENV instruction sees the variables from before it, as in Docker
            before = {**env, **args}
            for key, value in parse_key_values(ins.text, ins.line, "ENV"):
                env[key] = substitute(value, before)
    return {**env, **args} if upto is not None else env


def exec_argv(ins: Instruction | None) -> list[str]:
    """argv of an ENTRYPOINT/CMD (shell form becomes ``/bin/sh -c TEXT``, as Docker runs it)."""
    if ins is None:
        return []
    if ins.is_json_form():
        return ins.json_args()
    return ["/bin/sh", "-c", ins.text]


# -- .dockerignore ------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if i < len(pattern) and pattern[i] == "/":
                i += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


def load_dockerignore(path: str | Path) -> list[tuple[bool, re.Pattern[str]]]:
    """Patterns of a .dockerignore as (is_exception, regex), in file order."""
    rules = []
    path = Path(path)
    if not path.exists():
        return rules
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        line = line.strip("/")
        line = re.sub(r"/+", "/", line)
        line = line.removeprefix("./")
        rules.append((exception, _pattern_regex(line)))
    return rules


def is_ignored(rel_path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves ``rel_path`` (relative to the context root) out of the build context.

    A pattern applies if it matches the path or one of its parent directories; the last one wins.
    """
    parts = rel_path.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exception, regex in rules:
        if any(regex.match(c) for c in candidates):
            ignored = not exception
    return ignored


def _may_reinclude_below(dir_rel: str, patterns: list[str]) -> bool:
    """Whether an exception pattern (``!...``) could match something inside ``dir_rel``."""
    for raw in patterns:
        literal = re.split(r"[*?\[]", raw, maxsplit=1)[0]
        if raw.startswith(dir_rel + "/") or (literal != raw and (dir_rel + "/").startswith(literal)):
            return True
    return False


def context_files(
    root: str | Path, rules: list[tuple[bool, re.Pattern[str]]], exceptions: list[str] | None = None
) -> list[str]:
    """Every file Docker would send as the build context of ``root`` (relative paths, sorted).

    Directories that are ignored, with no exception pattern that could re-include something inside them,
    are not walked (as Docker does; it keeps .venv and .git cheap).
    """
    import os

    root = Path(root)
    if exceptions is None:
        exceptions = _exception_patterns(root / ".dockerignore")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        keep = []
        for d in dirnames:
            rel = f"{rel_dir}/{d}" if rel_dir else d
            if is_ignored(rel, rules) and not _may_reinclude_below(rel, exceptions):
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            rel = f"{rel_dir}/{f}" if rel_dir else f
            if not is_ignored(rel, rules):
                out.append(rel)
    return sorted(out)


def _exception_patterns(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [
        line.strip()[1:].strip().strip("/")
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("!")
    ]


# -- replaying commands outside Docker -----------------------------------------------------------------


def rewrite_paths(text: str, mapping: dict[str, str]) -> str:
    """Replace image paths (e.g. ``/mnt/store``) with local ones, whole path components only."""
    if not mapping:
        return text
    keys = sorted(mapping, key=len, reverse=True)
    alternation = "|".join(re.escape(k) for k in keys)
    regex = re.compile(rf"(?<![\w./-])({alternation})(?=$|[/\s\"':;,)\]}}])")
    return regex.sub(lambda m: mapping[m.group(1)], text)
