"""The prediction service: serves ``models:/<name>@champion`` over HTTP, takes clinicians'
feedback into the feedback store, and reloads when the champion moves (`serving.app`)."""
