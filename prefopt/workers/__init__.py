"""Ray actors. Each owns tensors; none parses configs from disk or talks to MLflow."""
