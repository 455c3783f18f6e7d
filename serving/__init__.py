"""The prediction service (built with the deploy and feedback issue)."""
