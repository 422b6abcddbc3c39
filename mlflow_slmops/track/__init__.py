"""MLflow tracking: the experiment and its tags (``tracking``), logging a variant's measurements (``log``),
and the sweep's tables, plots and report (``report``)."""
