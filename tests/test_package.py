"""The distribution installs one namespace with the three layers as subpackages."""
import ast
import importlib
import importlib.metadata
import os
import pkgutil
import re
import shutil
import subprocess
import tarfile
import sys
import tomllib
from pathlib import Path

import pytest


@pytest.mark.parametrize("name", ["chunkvault.store", "chunkvault.chunker", "chunkvault.remotes"])
def test_layers_are_subpackages(name):
    module = importlib.import_module(name)
    assert module.__name__ == name


def test_no_generic_top_level_names(tmp_path):
    # Run outside the source tree, where only what is installed is importable.
    code = (
        "import importlib.util, sys\n"
        "found = [n for n in ('store', 'chunker', 'remotes') if importlib.util.find_spec(n)]\n"
        "sys.exit(1 if found else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0


def test_errors_have_distinct_exit_codes():
    from chunkvault import errors

    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.ChunkvaultError)
    }
    assert {2, 3, 10, 11, 12, 13, 14, 15, 16, 17} <= codes


def _run(argv, tmp_path):
    return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env={k: v for k, v in os.environ.items() if not k.startswith("CHUNKVAULT_")})


def _entry_points():
    """Every way the command is started: ``python -m chunkvault`` was refused (no ``__main__``)."""
    ways = [[sys.executable, "-m", "chunkvault"], [sys.executable, "-m", "chunkvault.cli"]]
    script = Path(sys.executable).parent / "chunkvault"
    if script.exists():  # the installed console script, beside the interpreter of its environment
        ways.append([str(script)])
    return ways


@pytest.mark.parametrize("argv", _entry_points(), ids=lambda a: " ".join(Path(p).name for p in a))
def test_every_entry_point_runs_the_same_command(argv, tmp_path):
    import chunkvault

    version = _run([*argv, "--version"], tmp_path)
    assert (version.returncode, version.stdout) == (0, f"chunkvault {chunkvault.__version__}\n")
    no_repo = _run([*argv, "snapshots"], tmp_path)
    assert no_repo.returncode == 2 and no_repo.stderr.startswith("chunkvault: "), no_repo.stderr


def test_version_is_answered_without_loading_the_command(tmp_path):
    """Installers and scripts ask it: the command's modules took a tenth of a second to say one line.
    Output that cannot be written still gets the command's own message and exit code."""
    asked = _run([sys.executable, "-c", "import sys; sys.argv[1:] = ['--version']; "
                  "from chunkvault.console import main; code = main(); print('chunkvault.cli' in sys.modules, code)"],
                 tmp_path)
    assert asked.stdout.splitlines()[-1] == "False 0"
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            said = subprocess.run([sys.executable, "-m", "chunkvault", "--version"], stdout=full,
                                  stderr=subprocess.PIPE, text=True)
        assert said.returncode == 14 and "no space left on device" in said.stderr


def test_version_is_the_distributions():
    import chunkvault

    assert chunkvault.__version__ == importlib.metadata.version("chunkvault")


PACKAGES = ("chunkvault", "chunkvault.store", "chunkvault.chunker", "chunkvault.remotes")


def _modules():
    """Every module of the distribution, each package's own (an editable install maps the layers from
    directories of their own, which a walk of chunkvault's directory does not reach)."""
    names = set(PACKAGES)
    for package in PACKAGES:
        names.update(m.name for m in pkgutil.iter_modules(importlib.import_module(package).__path__, package + "."))
    return sorted(names)


def test_every_module_imports():
    for name in _modules():
        importlib.import_module(name)


def test_every_package_is_distributed():
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not a source tree")
    assert sorted(PACKAGES) == sorted(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])


def _third_party_imports():
    """Top-level names of the modules the package's sources import, anywhere in them (lazy imports too)."""
    found = set()
    for name in _modules():
        origin = importlib.util.find_spec(name).origin
        if not origin.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(Path(origin).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {n for n in found if n not in sys.stdlib_module_names and n not in ("chunkvault", "__future__")}


def _normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_distribution_is_declared():
    """A package imported directly must be a declared dependency, not one that only comes with another:
    urllib3 came with botocore, which also takes urllib3 1.26, under which the HTTP remote misreports TLS failures."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("not a source tree")
    declared = {_normalized(re.match(r"[A-Za-z0-9._-]+", d).group())
                for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]}
    owners = importlib.metadata.packages_distributions()
    imported = {n: {_normalized(d) for d in owners.get(n, [n])} for n in _third_party_imports()}
    assert {n: dists for n, dists in imported.items() if not dists & declared} == {}


#: Tracked files a source distribution leaves out: benchmarks and the CI entry point.
NOT_DISTRIBUTED = ("bench/", ".ci/", ".gitignore")


def _fresh_tree(tmp_path):
    """The tracked files a source distribution holds, copied as a fresh clone has them (no build products)."""
    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    wanted = {p for p in tracked.decode().split("\0") if p and not p.startswith(NOT_DISTRIBUTED)}
    tree = tmp_path / "tree"
    for path in wanted:
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / path, tree / path)
    return wanted, tree


def test_source_distribution_holds_everything_to_build_and_test(tmp_path):
    """An sdist made by setuptools before 69 lacked store/_stat_ns.h (only an
    extension's ``depends``): its build failed.  And it had only tests/test*.py, without conftest.py, the
    server helpers or tests/data: its suite could not run.  Built here from the tracked files alone, as from
    a fresh clone."""
    wanted, tree = _fresh_tree(tmp_path)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    built = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=tree, capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    with tarfile.open(tmp_path / "dist" / built.stdout.split()[-1]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert sorted(wanted - names) == []


def test_a_build_without_a_c_compiler_says_what_it_needs(tmp_path):
    """There is no pure-Python build (README: the install needs gcc and the Python headers); without a
    compiler it ended on ``[Errno 2] No such file or directory: 'gcc'`` alone."""
    _, tree = _fresh_tree(tmp_path)
    built = subprocess.run([sys.executable, "setup.py", "-q", "build_ext"], cwd=tree, capture_output=True,
                           text=True, env={**os.environ, "CC": "false"})
    assert built.returncode != 0
    assert "needs a C compiler (gcc) and the Python headers" in built.stderr.splitlines()[-1], built.stderr[-2000:]


# The layers of DESIGN.md import downward only: the chunker knows nothing of storage, the remotes nothing of
# chunks or crypto, the store nothing of the command line; each may use the package's base modules, which
# import only each other.
BASE_MODULES = {"errors", "argparsing", "localfiles", "processes", "tomlfile", "units", "interrupts", "memory"}
LAYERS = {"chunker": set(), "remotes": set(), "store": {"chunker", "remotes"}}


def _chunkvault_imports(path: Path, package: str) -> set[str]:
    """The chunkvault modules ``path`` (a module of ``package``) imports, anywhere in it, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
                if not node.module:  # from . import a, b: the modules themselves
                    names = [".".join(base + [a.name]) for a in node.names]
            else:
                names = [node.module or ""]
                if node.module == "chunkvault":  # from chunkvault import interrupts
                    names = [f"chunkvault.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "chunkvault" or n.startswith("chunkvault."))
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS) + ["base"])
def test_layers_import_downward_only(layer):
    root = Path(__file__).resolve().parent.parent
    if layer == "base":
        files, package, allowed = [root / "chunkvault" / f"{m}.py" for m in BASE_MODULES], "chunkvault", set()
    else:
        files, package, allowed = sorted((root / layer).glob("*.py")), f"chunkvault.{layer}", LAYERS[layer]
    wrong = {}
    for path in files:
        for name in _chunkvault_imports(path, package):
            parts = name.split(".")
            if name.startswith(package + ".") and layer != "base" or len(parts) == 2 and parts[1] in BASE_MODULES:
                continue
            if len(parts) >= 2 and (parts[1] in allowed or parts[1].startswith("__")):  # __version__
                continue
            wrong.setdefault(path.name, []).append(name)
    assert not wrong, wrong
