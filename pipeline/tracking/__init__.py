"""MLflow, and the only package that imports mlflow: runs, params, metrics and the model store
(`runs`), the registry's gates, promotion lock and rollback (`registry`), and the script MLflow runs
when it loads a model from code (`pyfunc`)."""
