"""The MLflow record: one client for runs, versions, aliases and history, one module naming every tag, the gates, lineage and tracking."""
