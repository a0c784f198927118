"""Reporting: a benchmark's results as tables (Markdown, CSV, LaTeX), figures (PNG, PDF) and the statistics they
show. Imports point one way: ``report`` may import ``bench.config``/``bench.grid`` and the layers below; of
``bench``, only the command modules (and ``collect``/``publish``) import ``report`` (``tests/test_architecture.py``)."""
