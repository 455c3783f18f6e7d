"""Running the loop: git and DVC versioning, the workspace scaffold, logs, run reports, the demo's simulated clinicians."""
