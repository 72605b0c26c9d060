"""The stage-0 start command: one POSIX ``sh`` command line that brings the runner up on a bare machine.

It must fit every provider's start-command limits (the strictest, Vast.ai: onstart + args <= 4,096 characters,
one env value <= 256), so it carries everything itself and needs no env value of ours: the program
(``stage0_program.py``: comments, docstrings and annotations dropped, names shortened) and this job's settings (token, TLS
certificate and key as DER, the runner's SHA-256, the runner's life flags) are compressed with zlib and
base64-encoded into one word (the dead-man hook goes beside it, base64-encoded, as the shell needs it too).
The line finds a ``python3`` >= 3.9 (else runs the dead-man hook and exits 127) and ``exec``s it on that word. The line holds no single quote (it can be wrapped in ``sh -c '...'``), no
backslash and no backtick. See ``docs/PROTOCOL.md`` section 4.
"""

from __future__ import annotations

import ast
import base64
import builtins
import functools
import importlib.resources
import itertools
import keyword
import re
import string
import zlib
from collections import Counter
from collections.abc import Iterator

from .tls import ChannelKeys

#: What the strictest provider leaves for the command (Vast.ai: 4,096 for onstart + args), less room for
#: the provider module's own wrapping (``bash -c ...``, an image's entry point).
MAX_COMMAND_CHARS = 3_500
DEFAULT_PORT = 8765
PROGRAM_RESOURCE = "stage0_program.py"
#: Exit status of the start command when the machine has no Python 3.9+.
NO_PYTHON_EXIT = 127

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_./+-]+")  # needs no quoting in sh
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DROPPED_IMPORTS = {"__future__", "typing"}


class _Strip(ast.NodeTransformer):
    """Docstrings, annotations and the imports only annotations need go: the program runs the same."""

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            body = body[1:]
        return body or [ast.Pass()]

    def visit_Module(self, node: ast.Module) -> ast.Module:
        self.generic_visit(node)
        body = [s for s in self._body(node.body) if not (isinstance(s, ast.ImportFrom) and s.module in _DROPPED_IMPORTS)]
        imports = [alias for s in body if isinstance(s, ast.Import) for alias in s.names]  # one import line
        node.body = [ast.Import(names=imports), *(s for s in body if not isinstance(s, ast.Import))]
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        self.generic_visit(node)
        node.body = self._body([s for s in node.body if not (isinstance(s, ast.AnnAssign) and s.value is None)])
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        self.generic_visit(node)
        node.returns = None
        node.body = self._body(node.body)
        return node

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.stmt | None:
        if node.value is None:
            return None
        return ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno)


class _Rename(ast.NodeTransformer):
    def __init__(self, names: dict[str, str], attrs: dict[str, str], owners: set[str]) -> None:
        self.names = names
        self.attrs = attrs
        self.owners = owners  # the variables that hold the program's own objects (self, instances)

    def visit_Name(self, node: ast.Name) -> ast.Name:
        node.id = self.names.get(node.id, node.id)
        return node

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.arg = self.names.get(node.arg, node.arg)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.Attribute:
        if isinstance(node.value, ast.Name) and node.value.id in self.owners:
            node.attr = self.attrs.get(node.attr, node.attr)
        self.generic_visit(node)
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        self.generic_visit(node)
        node.name = self.names.get(node.name, self.attrs.get(node.name, node.name))
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        self.generic_visit(node)
        node.name = self.names.get(node.name, node.name)
        return node


def _short_names(taken: set[str]) -> Iterator[str]:
    letters = string.ascii_letters
    for size in (1, 2):
        for chars in itertools.product(letters, repeat=size):
            name = "".join(chars)
            if name not in taken and not keyword.iskeyword(name):
                yield name


def _shorten(tree: ast.Module) -> ast.Module:
    """Every name the program defines (globals, classes, functions, parameters, locals; not ``main``) and every
    attribute it sets on ``self`` or defines as a method gets a one- or two-letter name. Attributes are renamed
    only on ``self`` and on variables assigned an instance of the program's classes (never ``hashlib.sha256``)."""
    imported = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names}
    defined: Counter[str] = Counter()
    attrs: Counter[str] = Counter()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)) or isinstance(node, ast.arg):
            defined[node.id if isinstance(node, ast.Name) else node.arg] += 0
        elif isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("__"):
            defined[node.name] += 0
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self" \
                and isinstance(node.ctx, ast.Store):
            attrs[node.attr] += 0
    methods = {f.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body
               if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")}
    for name in methods:
        del defined[name]
        attrs[name] += 0
    del defined["main"]
    clash = (set(defined) | set(attrs)) & (imported | set(dir(builtins)))
    if clash:
        raise AssertionError(f"stage-0 program: names that shadow a module or builtin: {sorted(clash)}")
    for node in ast.walk(tree):  # the most used names get the shortest
        if isinstance(node, ast.Name) and node.id in defined:
            defined[node.id] += 1
        elif isinstance(node, ast.Attribute) and node.attr in attrs:
            attrs[node.attr] += 1
    classes = {c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)}
    owners = {"self"} | {t.id for a in ast.walk(tree) if isinstance(a, ast.Assign) and isinstance(a.value, ast.Call)
                         and isinstance(a.value.func, ast.Name) and a.value.func.id in classes
                         for t in a.targets if isinstance(t, ast.Name)}
    taken = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | imported | set(dir(builtins)) | {"main"}
    short = _short_names(taken)
    names = {name: next(short) for name, _ in defined.most_common()}
    attr_names = {name: next(short) for name, _ in attrs.most_common()}
    return _Rename(names, attr_names, owners).visit(tree)


def _program_text() -> str:
    return importlib.resources.files(__package__).joinpath(PROGRAM_RESOURCE).read_text(encoding="utf-8")


@functools.cache
def _main_parameters() -> list[str]:
    """The parameters of the program's ``main``, in order (it is called positionally: they get short names)."""
    for node in ast.parse(_program_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == "main":
            return [a.arg for a in node.args.args]
    raise AssertionError("stage-0 program: no main()")


@functools.cache
def program_source() -> str:
    """The stage-0 program as shipped: ``stage0_program.py`` without docstrings, comments or annotations,
    with short names and one-space indents. It keeps the meaning: the transformed tree is checked against
    the re-parsed text."""
    tree = ast.fix_missing_locations(_shorten(_Strip().visit(ast.parse(_program_text()))))
    source = ast.unparse(tree)
    compact = re.sub(r"(?m)^(?:    )+", lambda m: " " * (len(m.group(0)) // 4), source).replace("\n\n", "\n")
    if ast.dump(ast.parse(compact)) != ast.dump(ast.parse(source)):
        raise AssertionError("stage-0 program: the compact form does not parse to the same program")
    return compact + "\n"


def _validate(token: str, runner_sha256: str, runner_args: list[str], port: int, port_env: str | None,
              python: str) -> None:
    if not token or any(c.isspace() for c in token):
        raise ValueError("the token must be one word")
    if not _SHA256.fullmatch(runner_sha256):
        raise ValueError("runner_sha256 must be 64 lowercase hex digits")
    if not all(isinstance(a, str) for a in runner_args):
        raise ValueError("runner_args must be strings")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a TCP port")
    if port_env is not None and not _ENV_NAME.fullmatch(port_env):
        raise ValueError(f"port_env {port_env!r} is not an environment variable name")
    if not _PLAIN_WORD.fullmatch(python):
        raise ValueError(f"python {python!r} must be a plain command name or path (letters, digits, _ . / + -)")


def _option(runner_args: list[str], name: str) -> str | None:
    """The value the runner's argparse would take for ``name`` (the last one given)."""
    value = None
    for i, a in enumerate(runner_args):
        if a == name and i + 1 < len(runner_args):
            value = runner_args[i + 1]
        elif a.startswith(name + "="):
            value = a[len(name) + 1 :]
    return value


def _hook(runner_args: list[str]) -> str | None:
    return _option(runner_args, "--on-exit") or None


def _without_hook(runner_args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in runner_args:
        if skip:
            skip = False
        elif a == "--on-exit":
            skip = True
        elif not a.startswith("--on-exit="):
            out.append(a)
    return out


def _idle_timeout(runner_args: list[str]) -> float:
    """The runner's ``--idle-timeout`` (0: none), which bounds stage-0's wait too."""
    raw = _option(runner_args, "--idle-timeout")
    try:
        value = float(raw) if raw is not None else 0.0
    except ValueError:
        raise ValueError(f"--idle-timeout {raw!r} is not a number of seconds") from None
    return value if value > 0 else 0.0


def stage0_command(*, token: str, keys: ChannelKeys, runner_sha256: str, runner_args: list[str],
                   port: int = DEFAULT_PORT, port_env: str | None = None, python: str = "python3") -> str:
    """The start command for one job's machine (one ``sh`` line, see the module docstring).

    On the machine it serves HTTPS with ``keys`` on ``0.0.0.0`` at the port in the environment variable
    ``port_env`` when that is set (RunPod's ``RUNPOD_TCP_PORT_<n>``), else ``port``; accepts one
    ``PUT /v1/runner`` authenticated with ``token`` whose body hashes to ``runner_sha256`` (else 400, and it
    keeps waiting), then ``exec``s ``python runner.py --state-dir ... --host 0.0.0.0 --port PORT --token-file F
    --tls-cert C --tls-key K <runner_args>``. With no authenticated request for the ``--idle-timeout`` of
    ``runner_args`` it exits and runs their ``--on-exit`` hook (reason ``idle-before-start``). ``python`` is the
    interpreter tried first (then ``python3``, ``python``); the first that is 3.9 or later runs it.

    The token and the key are in the result (compressed, not encrypted): it goes only to the provider's API
    over HTTPS, never into a log, a Job or an exception.
    """
    _validate(token, runner_sha256, runner_args, port, port_env, python)
    settings = {
        "token": token,
        "cert": base64.b64encode(keys.cert_der()).decode("ascii"),
        "key": base64.b64encode(keys.key_der()).decode("ascii"),
        "sha256": runner_sha256,
        "args": _without_hook(runner_args),  # the hook goes as the command's second word (base64)
        "idle": _idle_timeout(runner_args),
        "port": port,
        "port_env": port_env,
        "name": "job-" + keys.fingerprint_sha256[:16],  # the machine-side dir: stable across container restarts
    }
    if list(settings) != _main_parameters():
        raise AssertionError("stage-0 settings do not follow main()'s parameters")
    program = program_source() + "main(" + ", ".join(repr(v) for v in settings.values()) + ")\n"
    blob = base64.b64encode(zlib.compress(program.encode("utf-8"), 9)).decode("ascii")
    # The first candidate that is Python 3.9+ ("" ends the loop empty-handed: `-c` is no command).
    candidates = " ".join(dict.fromkeys([python, "python3", "python"]))
    hook = _hook(runner_args)
    head = tail = ""
    no_python = "echo trainorch stage-0: no Python 3.9+ >&2;"
    if hook is not None:  # the dead-man switch, even without a Python; the program takes it from there too
        head = "H=" + base64.b64encode(hook.encode("utf-8")).decode("ascii") + ";"
        no_python += "echo $H|base64 -d|TRAINORCH_EXIT_REASON=no-python sh;"
        tail = " $H"
    command = (
        f'{head}for P in {candidates} "";do $P -c "import sys;sys.exit(sys.version_info<(3,9))"&&break;done;'
        f'[ "$P" ]||{{ {no_python}exit {NO_PYTHON_EXIT};}};'
        f'exec $P -c "import base64,sys,zlib;exec(zlib.decompress(base64.b64decode(sys.argv[1])))" {blob}{tail}'
    )
    if len(command) > MAX_COMMAND_CHARS:
        raise ValueError(f"the stage-0 command is {len(command)} characters, more than the {MAX_COMMAND_CHARS} every "
                         f"provider takes; shorten the --on-exit hook ({len(hook or '')} characters)")
    return command
