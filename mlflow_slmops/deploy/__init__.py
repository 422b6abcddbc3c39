"""Deployment: the chat request and response shapes every target shares (``chat``), and the ``foundry-local``
MLflow deployment target (``foundry_local``)."""
