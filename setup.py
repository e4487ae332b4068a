"""Maps the top-level folders to the `kopilka.*` namespace, builds the kernel,
and generates the public API's modules (`kopilka.v1`) from proto/."""

import importlib.util
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

HERE = Path(__file__).resolve().parent
PACKAGES = ["core", "kernel", "servers", "hwd"]
# Generated at build time by tools/gen_proto.py from proto/kopilka/v1/*.proto;
# never committed.
GENERATED = {"kopilka.v1": "gen/kopilka/v1"}


def generate_api():
    """(Re)generate kopilka.v1 when it is missing or older than its .proto
    files. It runs on import, before setup(), so that every way of building
    (make, `pip install .`, `pip install -e .`) finds the mapped package
    directory, which setuptools refuses to map when it does not exist."""
    spec = importlib.util.spec_from_file_location("gen_proto", HERE / "tools" / "gen_proto.py")
    gen_proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_proto)
    if gen_proto.stale():
        gen_proto.generate()


generate_api()

kernel = Extension(
    "kopilka.kernel._ledger",
    sources=["kernel/_ledger.pyx"],
    libraries=["lmdb", "sodium"],
    extra_compile_args=["-O2", "-Wno-address-of-packed-member"],
)

# The pricing engine's per-line loops (core/_pricing.pyx), the compiled twin
# of pure-Python code in core/pricing.py, which is used when this is not built.
pricing = Extension(
    "kopilka.core._pricing",
    sources=["core/_pricing.pyx"],
    extra_compile_args=["-O2"],
)

setup(
    packages=["kopilka"] + [f"kopilka.{name}{sub}" for name in PACKAGES
                            for sub in ["", *(f".{p}" for p in find_packages(name))]]
             + list(GENERATED),
    package_dir={"kopilka": "kopilka", **{f"kopilka.{n}": n for n in PACKAGES},
                 **GENERATED},
    package_data={"kopilka.v1": ["*.pyi"]},
    ext_modules=cythonize([kernel, pricing], language_level=3,
                          compiler_directives={"boundscheck": False,
                                               "wraparound": False}),
)
