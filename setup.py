"""Build of masqd's one native module (the data plane's fast path); everything else is in pyproject.toml.

``optional=True``: without a C compiler masqd still installs, and runs its pure-Python
fast path (``[dataplane] fastpath = "python"`` behaviour, with a warning at start).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "masqd.dataplane._fastpath",
            ["masqd/dataplane/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
