"""The package's layering: imports only go down (or sideways within a layer), no import loops
(type-only and function-level imports included), and the command-line doors answer."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "echorl_jax"

# Lowest first. A module may import its own layer and the layers below it.
LAYERS = [
    ("models", "rewards", "tasks", "sharding"),
    ("sampling", "data", "rl"),
    ("config",),
    ("trainer",),
    ("evaluation", "main", "plan", "planner", "compare", "launch", "cli", "__main__", "evaluate", "data_prep", "analyze_steps"),
]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: pathlib.Path, mods) -> set[str]:
    """Every echorl_jax module ``path`` imports anywhere (module level, functions, TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                found.add(full if full in mods else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in mods}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it")


def test_every_import_goes_down_or_sideways():
    mods = _modules()
    upward = []
    for m, p in mods.items():
        if m == "echorl_jax":
            continue
        for dep in _imports(p, mods):
            if dep != "echorl_jax" and _layer(dep) > _layer(m):
                upward.append(f"{m} imports {dep}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_loops():
    mods = _modules()
    # a package's __init__ re-exporting its submodules (and they importing its siblings) is not a loop
    related = lambda a, b: a == b or a.startswith(b + ".") or b.startswith(a + ".")  # noqa: E731
    graph = {m: {d for d in _imports(p, mods) if not related(m, d)} for m, p in mods.items()}
    loops, state = [], {}

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                loops.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif not state.get(v):
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m, [])
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_top_level_holds_entry_points_config_sharding_and_subpackages():
    files = sorted(p.name for p in PKG.glob("*.py"))
    assert files == sorted(["__init__.py", "__main__.py", "cli.py", "main.py", "config.py", "sharding.py", "plan.py",
                            "compare.py", "launch.py", "evaluate.py", "data_prep.py", "analyze_steps.py"])
    doors = {"evaluate.py", "data_prep.py", "analyze_steps.py"}
    for name in doors:  # thin doors: the code lives in the subpackages
        assert len((PKG / name).read_text().splitlines()) < 12, name


def _run(*args, **kwargs):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120,
                          **kwargs)


@pytest.mark.slow  # one subprocess per tool (13 s of imports); CI's slow set runs it
def test_every_tool_answers_help_in_its_documented_form():
    from echorl_jax.cli import TOOLS

    for tool in TOOLS:
        proc = _run("-m", f"echorl_jax.{tool}", "--help")
        assert proc.returncode == 0, (tool, proc.stderr[-2000:])
        assert f"usage: python -m echorl_jax.{tool}" in proc.stdout, (tool, proc.stdout[:300])
        sub = _run("-m", "echorl_jax", tool, "--help")
        assert sub.returncode == 0 and sub.stdout == proc.stdout, tool
    bad = _run("-m", "echorl_jax", "evaluat")
    assert bad.returncode == 2 and "unknown tool 'evaluat'" in bad.stderr and "evaluate" in bad.stderr


def test_no_pytorch_advice_without_torch():
    """transformers says "PyTorch was not found ..." on import without torch; we only use its tokenizers."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from echorl_jax.tasks.tokenizer import build_char_tokenizer\n"
            "from echorl_jax.models.tokenizer import transformers_quietly\n"
            "assert transformers_quietly().PreTrainedTokenizerFast is not None\n"
            "print(build_char_tokenizer().encode('1+1'))")
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PyTorch was not found" not in proc.stderr + proc.stdout
