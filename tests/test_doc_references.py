"""Docs that cannot drift: every name of gere_ds / gere_assets, config key, repository file and
test that README.md and docs/*.md cite must exist.

What counts as a citation (inside backticks, except full ``gere_ds.`` names, found anywhere):

* a dotted Python name: ``gere_ds.evaluation.stats.rank_correlation``, or ``module.attr`` whose
  first part names a module of the packages (``losses.tri_states``, ``stop.check()``,
  ``evaluation.stats.rank_correlation``); it must import and have the attributes;
* a config key (``replay.tm_dead_band``, ``train.lora.continual``): a field path of RunConfig;
* a repository path (``configs/demo.yaml``, ``launch/run_benchmark.sh``) under a tracked
  top-level folder, or a file at the top (``setup.cfg``): it must exist;
* a source file named alone (``teacher_cache.py``): a file of that name must be in the repo;
* a class or call named alone (``EvalSuite``, ``prepare_teacher_data()``): defined in the code;
* a test (``test_resume.py::test_name``): that function must be in tests/;
* a Markdown link or image to a file (``![fit](results/continual/fit.png)``): relative to the
  page, it must exist;
* in a call diagram (a fenced block drawn with ``->``): every function, class, method and
  ``module.name`` it draws must be defined in the code.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import subprocess
import typing
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGES = ("gere_ds", "gere_assets")

TICKS = re.compile(r"`([^`\n]+)`")
FULL_NAME = re.compile(r"\b(?:gere_ds|gere_assets)(?:\.[A-Za-z_]\w*)+")
DOTTED = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?$")
TEST_REF = re.compile(r"^(?:tests/)?(test_\w+\.py)(?:::(\w+)(?:\[[^\]]*\])?)?$")
PATHISH = re.compile(r"^[\w.\-]+(?:/[\w.\-]*)+$")
FILE_EXT = re.compile(r"\.(?:py|sh|md|json|jsonl|yaml|yml|txt|cfg|toml|png|csv|log|lock|bin|npy|"
                      r"pt|parquet)$")

# Dotted spans that name something outside gere-ds although their first part is also one of its
# module names: DeepSpeed's engine methods, the Hugging Face model's attributes.
NOT_OURS = {"engine.step", "engine.backward", "engine.module.get_output_embeddings", "model.norm",
            "model.model.norm", "engine.load_checkpoint"}
# Words a call diagram may use that are not code of this repository.
DIAGRAM_WORDS = {"TensorBoard"}
# Classes and calls the pages name that belong to Python, DeepSpeed or Hugging Face.
OUTSIDE_NAMES = {"DeepSpeedEngine", "TrainerCallback", "ForCausalLMLoss", "open"}
CLASS_OR_CALL = re.compile(r"^(?:[A-Za-z_]\w*\(\)|[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+)$")
# Pages other code cites that are not (yet) in the repository, with the file citing them; each must
# still be cited and still be missing (test below), so a fixed one has to leave this list.
KNOWN_MISSING_CITED_PAGES: set[tuple[str, str]] = set()


@lru_cache(maxsize=None)
def tracked() -> frozenset[str]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return frozenset(out.stdout.split())


@lru_cache(maxsize=None)
def modules() -> dict[str, list[str]]:
    """Every dotted suffix of every module name ('stats', 'evaluation.stats', ...) -> modules."""
    out: dict[str, list[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            for i in range(len(parts)):
                out.setdefault(".".join(parts[i:]), []).append(".".join(parts))
    return out


def _resolves(module: str, attrs: list[str]) -> bool:
    try:
        obj = importlib.import_module(module)
    except ImportError:
        return False
    for attr in attrs:
        if hasattr(obj, attr):
            obj = getattr(obj, attr)
            continue
        try:  # a submodule not imported by its package
            obj = importlib.import_module(f"{obj.__name__}.{attr}")
        except (ImportError, AttributeError):
            return False
    return True


def python_name_exists(name: str) -> bool:
    """A dotted name whose longest leading part is a module of the packages (or a suffix of one)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        for module in modules().get(".".join(parts[:cut]), []):
            if _resolves(module, parts[cut:]):
                return True
    return False


def names_a_module(name: str) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:cut]) in modules() for cut in range(1, len(parts)))


@lru_cache(maxsize=None)
def config_root() -> type:
    from gere_ds.config.sections import RunConfig

    return RunConfig


def config_key_exists(key: str) -> bool:
    """``a.b.c`` is a field path of RunConfig (lists of sections: ``eval.general.kind``)."""
    cls: typing.Any = config_root()
    for part in key.split("."):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = _section(hints[part])
    return True


def _section(hint: typing.Any) -> typing.Any:
    """The dataclass inside Optional[...] / list[...], else the hint itself."""
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
        inner = _section(arg)
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            return inner
    return hint


def is_config_section(name: str) -> bool:
    """Whether the first part names a section of the config (train, replay, ...)."""
    hint = typing.get_type_hints(config_root()).get(name.split(".")[0])
    section = _section(hint) if hint is not None else None
    return isinstance(section, type) and dataclasses.is_dataclass(section)


def cited_test_exists(ref: re.Match) -> bool:
    path = REPO / "tests" / ref.group(1)
    if not path.is_file():
        return False
    return ref.group(2) is None or re.search(rf"^\s*def {ref.group(2)}\(", path.read_text(),
                                             re.M) is not None


def path_problem(span: str) -> str | None:
    """Why a cited repository path is wrong (None: it exists, or it is not a repository path)."""
    top = span.split("/")[0]
    top_dirs = {t.split("/")[0] for t in tracked() if "/" in t}
    if top not in top_dirs:
        return None  # a run's or the assets' output (runs/..., assets/...), a URL, a module path
    where = span.rstrip("/")
    if where in tracked() or any(t.startswith(where + "/") for t in tracked()) or _ignored(span):
        return None  # in the repository, or ignored: something a run writes (bench/results/...)
    return f"not in the repository: {span}"


def _ignored(span: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", span], cwd=REPO,
                          check=False).returncode == 0


def source_file_exists(name: str) -> bool:
    return any(t.endswith("/" + name) or t == name for t in tracked())


def problems(text: str) -> list[str]:
    out = []
    for name in sorted(set(FULL_NAME.findall(text))):
        if not python_name_exists(name):
            out.append(f"{name}: does not import")
    for span in sorted({m.group(1).strip() for m in TICKS.finditer(text)}):
        if re.search(r"[<>{}*$ ]", span) or "://" in span:
            continue  # a placeholder, a pattern, a command line or a URL
        ref = TEST_REF.match(span)
        if ref:
            if not cited_test_exists(ref):
                out.append(f"{span}: no such test")
        elif PATHISH.match(span) and "/" in span:
            problem = path_problem(span)
            if problem:
                out.append(problem)
        elif FILE_EXT.search(span):
            if span.endswith(".py") and "." not in span[:-3] and not source_file_exists(span) \
                    and names_a_module(span[:-3]):
                out.append(f"{span}: no such source file")
        elif CLASS_OR_CALL.match(span):
            name = span.removesuffix("()")
            if name not in defined_names() and name not in OUTSIDE_NAMES:
                out.append(f"{span}: defined nowhere")
        elif DOTTED.match(span):
            name = span.removesuffix("()")
            if name in NOT_OURS or name.startswith(PACKAGES):
                continue  # full names were checked above
            if is_config_section(name):
                if not config_key_exists(name) and not python_name_exists(name):
                    out.append(f"{span}: neither a config key nor a name of the packages")
            elif names_a_module(name) and not python_name_exists(name):
                out.append(f"{span}: does not import")
    return out


@lru_cache(maxsize=None)
def defined_names() -> frozenset[str]:
    """Every module, function, class, method, field and assigned name of the repository's code
    (tests left out: their strings would vouch for any name)."""
    out: set[str] = set()
    for name in tracked():
        if not name.endswith(".py") or name.startswith("tests/"):
            continue
        out.add(Path(name).stem)
        for node in ast.walk(ast.parse((REPO / name).read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.add(node.name)
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.isidentifier():
                out.add(node.value)  # a value the config or a registry accepts
            for target in targets:
                if isinstance(target, ast.Name):
                    out.add(target.id)
                elif isinstance(target, ast.Attribute):
                    out.add(target.attr)
    return frozenset(out)


def diagrams(text: str) -> list[str]:
    """The fenced blocks without a language that draw calls with ``->``."""
    blocks, current, info = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if not info and any("->" in x for x in current):
                    blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


DIAGRAM_TOKEN = re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\b")


def diagram_problems(text: str) -> list[str]:
    """Names a call diagram draws that the code does not define."""
    out = []
    for block in diagrams(text):
        for token in sorted(set(DIAGRAM_TOKEN.findall(block))):
            parts = token.split(".")
            if token in NOT_OURS or token in DIAGRAM_WORDS or FILE_EXT.search(token):
                continue
            if len(parts) > 1:  # module.name, or object.method (the caller's variable first)
                ok = python_name_exists(token) or all(p in defined_names() for p in parts[1:])
            elif "_" in token.strip("_") or re.match(r"^[A-Z][a-z]+[A-Z]", token):
                ok = token in defined_names()  # a code name; plain words are prose
            else:
                continue
            if not ok:
                out.append(f"{token}: drawn in a call diagram, defined nowhere")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_name_a_call_diagram_draws_is_defined(page):
    found = diagram_problems(page.read_text(encoding="utf-8"))
    assert not found, f"{page.relative_to(REPO)}: " + "; ".join(found)


def link_problems(page: Path, text: str) -> list[str]:
    """Links and images to files of the repository (relative to the page) that are missing."""
    out = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the page
        if not (page.parent / target.split("#")[0]).exists():
            out.append(f"{target}: the link leads nowhere")
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_leads_to_a_file(page):
    found = link_problems(page, page.read_text(encoding="utf-8"))
    assert not found, f"{page.relative_to(REPO)}: " + "; ".join(found)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_name_path_and_test_a_page_cites_exists(page):
    found = problems(page.read_text(encoding="utf-8"))
    assert not found, f"{page.relative_to(REPO)}: " + "; ".join(found)


def test_code_cites_only_pages_that_exist():
    cited = set()
    for name in tracked() - {str(Path(__file__).relative_to(REPO))}:  # its examples cite none
        if name.endswith((".py", ".sh", ".yaml")):
            text = (REPO / name).read_text(encoding="utf-8", errors="replace")
            cited |= {(name, page) for page in re.findall(r"\bdocs/[\w./-]+\.md\b", text)}
    missing = {(f, page) for f, page in cited if not (REPO / page).is_file()}
    assert missing == KNOWN_MISSING_CITED_PAGES, \
        f"pages cited but missing: {sorted(missing - KNOWN_MISSING_CITED_PAGES)}; fixed, drop " \
        f"from the list: {sorted(KNOWN_MISSING_CITED_PAGES - missing)}"


# The checker itself.

@pytest.mark.parametrize("text, bad", [
    ("`gere_ds.evaluation.stats.rank_correlation` and `losses.tri_states`", []),
    ("see gere_ds.evaluation.stats.no_such_function", ["does not import"]),
    ("`losses.no_such_thing`", ["does not import"]),
    ("`replay.tm_dead_band` and `train.lora.continual` and `eval.general`", []),
    ("`replay.no_such_key`", ["neither a config key"]),
    ("`configs/demo.yaml` and `docs/no_such_page.md`", ["not in the repository: docs/no_such"]),
    ("`runs/demo/metrics.json` and `torch.save` and `<output_dir>/x.json`", []),
    ("`test_resume.py::test_no_such_test` and `teacher_cache.py`", ["no such test"]),
    ("`no_such_module.py` is fine, `losses.py` exists", []),
    ("`EvalSuite`, `prepare_teacher_data()`, `NoSuchClass` and `no_such_call()`",
     ["NoSuchClass", "no_such_call()"]),
])
def test_the_checker_finds_what_is_missing(text, bad):
    found = problems(text)
    assert len(found) == len(bad) and all(b in f for b, f in zip(bad, found)), found


def test_the_link_checker_finds_what_is_missing():
    text = "![fit](results/continual/fit.png), [x](https://example.org) and [y](no/such.md#a)"
    assert link_problems(REPO / "docs" / "results.md", text) == [
        "no/such.md#a: the link leads nowhere"]


def test_the_diagram_checker_finds_what_is_missing():
    drawn = "```\nrun -> plan_resume -> no_such_step, Checkpointer.save -> losses.no_such_term\n```\n"
    assert diagram_problems(drawn) == ["losses.no_such_term: drawn in a call diagram, defined nowhere",
                                       "no_such_step: drawn in a call diagram, defined nowhere"]
    assert diagram_problems("```\nno_such_step without an arrow\n```\n") == []
