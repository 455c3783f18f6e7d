"""The model itself: architectures, calibration, the MLflow pyfunc, Grad-CAM, clinical metrics, the model card."""
