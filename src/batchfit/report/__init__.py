"""Reports: ``report.json``, ``report.md`` and PNG plots for ``tune``; the same for ``sweep``."""
