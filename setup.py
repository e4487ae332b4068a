"""Maps the top-level folders to the `kopilka.*` namespace and builds the kernel."""

from Cython.Build import cythonize
from setuptools import Extension, setup

PACKAGES = ["core", "kernel", "servers", "hwd"]

kernel = Extension(
    "kopilka.kernel._ledger",
    sources=["kernel/_ledger.pyx"],
    libraries=["lmdb", "sodium"],
    extra_compile_args=["-O2", "-Wno-address-of-packed-member"],
)

setup(
    packages=["kopilka"] + [f"kopilka.{name}" for name in PACKAGES],
    package_dir={"kopilka": "kopilka", **{f"kopilka.{n}": n for n in PACKAGES}},
    ext_modules=cythonize([kernel], language_level=3,
                          compiler_directives={"boundscheck": False,
                                               "wraparound": False}),
)
