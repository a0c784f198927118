"""Reporting: reading a benchmark's results (``collect`` from a store, ``publish`` to and from published files) and
showing them as tables (Markdown, CSV, LaTeX), figures (PNG, PDF) and the statistics they rest on. Imports point
one way: ``report`` may import ``bench.config``/``bench.grid``/``bench.measures`` and the layers below; of ``bench``,
only the command modules import ``report`` (``tests/test_architecture.py``)."""
