"""Build the C chunker, directory scanner, manifest decoder, delta match finder, file reads and writes,
PostgreSQL page checksums.

All other metadata lives in pyproject.toml.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError

NEEDS = ("chunkvault needs a C compiler (gcc) and the Python headers (Debian, Ubuntu: apt-get install gcc "
         "python3-dev) to install; it has no pure-Python build")


class BuildRequiredExtensions(build_ext):
    """Every extension is required, and a build without a compiler or the headers ended on the compiler's last
    words alone (``[Errno 2] No such file or directory: 'gcc'``, ``Python.h: No such file``): say what is needed."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError, OSError) as exc:
            raise CompileError(f"building {ext.name} failed ({exc}): {NEEDS}") from exc


setup(
    cmdclass={"build_ext": BuildRequiredExtensions},
    ext_modules=[
        Extension(
            "chunkvault.chunker._fastcdc",
            sources=["chunker/_fastcdc.c"],
            extra_compile_args=["-O3", "-std=c99", "-Wall", "-Wextra"],
        ),
        Extension(
            "chunkvault.store._scandir",
            sources=["store/_scandir.c"],
            depends=["store/_stat_ns.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "chunkvault.store._manifest",
            sources=["store/_manifest.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "chunkvault.store._blobtable",
            sources=["store/_blobtable.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "chunkvault.store._deltamatch",
            sources=["store/_deltamatch.c"],
            extra_compile_args=["-O3", "-Wall", "-Wextra"],
        ),
        Extension(
            "chunkvault.store._writefiles",
            sources=["store/_writefiles.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "chunkvault._pgpages",
            sources=["chunkvault/_pgpages.c"],
            extra_compile_args=["-O3", "-Wall", "-Wextra"],
        ),
        Extension(
            "chunkvault.remotes._fileio",
            sources=["remotes/_fileio.c"],
            depends=["store/_stat_ns.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
    ]
)
