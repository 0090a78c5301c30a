"""nbval settings for the notebooks: compare stdout and results, not stderr (warnings differ by version)."""

from __future__ import annotations


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)
