"""Test helpers shipped with aiwfd (as aiohttp ships aiohttp.test_utils): the
parts that aiwfd's own tests and its benchmark scripts share, so that no
script imports ``tests/``.

- :mod:`aiwfd.testing.fakeopenai`: a fake OpenAI-compatible model server
  (in-process, or ``python -m aiwfd.testing.fakeopenai`` as a process).
- :mod:`aiwfd.testing.processes`: a free port, a child's output waited on line
  by line, ``aiwfd`` and the fake as child processes.
- :mod:`aiwfd.testing.inprocess`: aiwfd's real server inside a test's loop.
- :mod:`aiwfd.testing.nginxconf`: the shipped nginx config made runnable in a
  temporary directory.
- :mod:`aiwfd.testing.metrics`: ``/metrics`` scraped into comparable numbers.

It sits above every layer (it starts the daemon) and nothing else in aiwfd
may import it: it is for tests and scripts only, and the package runs
without it. Importing this package imports none of its modules.
"""
