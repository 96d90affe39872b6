"""advtrain: distributed adversarial training on Ray Train, tracked in MLflow.

Importing the package (or any module of it) has no side effects: no Ray, no tracking URI, no files.
"""
