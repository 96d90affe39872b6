"""MLflow, and the only package that imports mlflow: runs, params, metrics and tags (`runs`), the model
store (`model_store`: safetensors + architecture, register, resolve, load), promotion lock, history and
rollback (`registry`) with its gates (`gates`), and the script MLflow runs when it loads a model from
code (`pyfunc`)."""
