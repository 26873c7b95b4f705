"""Build the C chunker and directory scanner; all other metadata lives in pyproject.toml."""
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
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
    ]
)
