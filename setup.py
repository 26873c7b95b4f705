"""Build the C chunker, directory scanner, manifest decoder, delta match finder, file reads and writes,
PostgreSQL page checksums.

All other metadata lives in pyproject.toml.
"""
from setuptools import Extension, setup

setup(
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
