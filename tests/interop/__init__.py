"""The interop suite: real VPN software in User-Mode Linux guests around masqd (``-m interop``).

``harness/`` builds and plays the scenarios, ``catalog.py`` holds the
scenarios the tests run and ``checks.py`` what must hold after each one.
"""
