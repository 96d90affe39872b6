"""The Fashion-MNIST results table (issue 4): one row per trained recipe, every number measured here.

    MLFLOW_TRACKING_URI=sqlite:////path/mlflow.db .venv/bin/python benchmarks/fashion_mnist_table.py \
        --runs fmnist-fast fmnist-free fmnist-pgd fmnist-trades fmnist-mart [--protocol standard]

For each run (by name, in the recipes' MLflow experiment) it loads the model that run registered (its
best-robust epoch), then measures in fp32 on this machine:
  - clean accuracy on the full 10,000-example test split,
  - PGD-20 robust accuracy (step 2.5 eps / 20, one random start) on the full test split,
  - robust accuracy under the `standard` ensemble (APGD-CE, APGD-T x9, Square 5000) on the first
    1,000 test examples with its 95% Wilson interval,
and reads the training wall time (MLflow run start to end: Ray start-up, training, per-epoch
validation, test metrics and registration) and the pure training time (sum of time/train_s). Merges
the rows into benchmarks/results/fashion_mnist.json (a run measured again replaces its row; rows of
other runs stay) and prints the markdown table of all rows for RESULTS.md. `--ensemble-only` skips the
10k pass and keeps the run's earlier 10k numbers: the ensemble of a run measured before, without paying
again for PGD-20 on 10,000 examples. `--device cuda` measures on the GPU (fp32 without TF32, as `advtrain
evaluate` runs there); the default, cpu, is what the table in RESULTS.md was measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from devices import add_device_option, describe, elapsed, synchronize

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run names (run.name of each recipe's run)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""))
    parser.add_argument("--experiment", default="fashion-mnist-linf")
    parser.add_argument("--data", default=str(ROOT / "data/fashion-mnist"))
    parser.add_argument("--protocol", default="standard", choices=["standard", "fast", "pgd", "none"])
    parser.add_argument("--ensemble-examples", type=int, default=1000)
    parser.add_argument(
        "--ensemble-only",
        action="store_true",
        help="skip the 10k clean and PGD-20 pass (minutes per run); the row keeps those of its earlier row in --out",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/fashion_mnist.json"))
    add_device_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.data import load_split
    from pipeline.evaluate import evaluate_examples, evaluation_numerics, wilson_interval
    from pipeline.tracking import model_store
    from pipeline.tracking import runs as tracking
    from pipeline.training.validation import pgd20_correct, predict

    uri = tracking.resolve_tracking_uri(args.tracking_uri, cwd=ROOT)
    client = tracking.client_for(uri)
    x_test, y_test = load_split(args.data, "test")
    device = args.device
    if device.type == "cuda":
        evaluation_numerics()
    out = Path(args.out)
    earlier = {r["run"]: r for r in json.loads(out.read_text())["rows"]} if out.exists() else {}
    rows = []
    for name in args.runs:
        run_id = tracking.find_run(uri, args.experiment, name)
        if run_id is None:
            raise SystemExit(f"no run named '{name}' in experiment '{args.experiment}' at {uri}")
        run = client.get_run(run_id)
        params = run.data.params
        eps = float(params["attack.eps"])
        # On the device: predict/pgd20_correct move the batches there, evaluate_examples follows the model.
        model = model_store.load_model(f"runs:/{run_id}/model", tracking_uri=uri).eval().to(device)
        synchronize(device)
        started = time.perf_counter()
        row = {
            "run": name,
            "method": params["method.name"],
            "epochs": int(params["run.epochs"]),
            "registered_epoch": int(float(run.data.metrics.get("registered/epoch", params["run.epochs"]))),
            "wall_s": (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else None,
            "train_s": sum(v for _, v in tracking.metric_history(uri, run_id, "time/train_s")),
            "catastrophic_overfitting": run.data.tags.get("advtrain.catastrophic_overfitting"),
        }
        if args.ensemble_only:
            if "clean_acc_10k" not in earlier.get(name, {}):
                raise SystemExit(f"--ensemble-only: {args.out} has no 10k row for '{name}'; run once without it")
        else:
            clean = float((predict(model, x_test, batch_size=500, device=device) == y_test).float().mean())
            pgd20 = pgd20_correct(model, x_test, y_test, eps=eps, norm=params["attack.norm"], device=device)
            row |= {"clean_acc_10k": clean, "pgd20_acc_10k": pgd20["robust_correct"] / pgd20["count"]}
            # Printed before the ensemble, which takes tens of minutes: an interrupted run keeps these.
            print(f"{name}: clean (10k) {clean:.4f}, PGD-20 (10k) {row['pgd20_acc_10k']:.4f}", flush=True)
        if args.protocol != "none":
            n = args.ensemble_examples
            ensemble_started = time.perf_counter()

            def progress(chunk, name=name, n=n, ensemble_started=ensemble_started):
                robust = int(chunk.robust.sum())
                done = chunk.start + len(chunk.clean_correct)
                minutes = elapsed(ensemble_started, device) / 60
                print(
                    f"{name}: {args.protocol} on examples {chunk.start}-{done - 1} of {n}: {robust} robust, "
                    f"{minutes:.1f} min so far",
                    flush=True,
                )

            result = evaluate_examples(
                model,
                x_test[:n],
                y_test[:n],
                norm=params["attack.norm"],
                eps=eps,
                protocol=args.protocol,
                seed=0,
                chunk_size=250,
                on_chunk=progress,
            )
            robust = int(result.robust.sum())
            low, high = wilson_interval(robust, n)
            row |= {
                "protocol": args.protocol,
                "ensemble_acc": robust / n,
                "ensemble_ci95": [low, high],
                "ensemble_examples": n,
                "ensemble_s": elapsed(ensemble_started, device),
                # Where the ensemble's strength comes from: robust accuracy after each attack in turn,
                # and each attack's seconds (it runs only on the points still robust).
                "ensemble_after": {k: float(v.float().mean()) for k, v in result.robust_after.items()},
                "ensemble_attack_s": result.seconds,
            }
        row["measure_s"] = elapsed(started, device)
        row["device"] = describe(device)
        rows.append(row)
        print(json.dumps(row), flush=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Runs measured earlier (possibly on a machine that is gone) keep their rows; a re-measured run's
    # row is replaced, keeping what the old row had and this measurement did not (e.g. its ensemble).
    # Read again: another invocation may have written the file since this one started.
    by_run = {r["run"]: r for r in json.loads(out.read_text())["rows"]} if out.exists() else {}
    for r in rows:
        by_run[r["run"]] = {**by_run.get(r["run"], {}), **r}
    rows = list(by_run.values())
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                f"{torch.__version__}, {args.threads} threads",
                "rows": rows,
            },
            indent=2,
        )
    )
    print()
    print(
        f"| method | run | clean (10k) | PGD-20 (10k) | {args.protocol} (first {args.ensemble_examples}) [95% CI] "
        "| registered epoch | training wall time | of which training |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ensemble = (
            f"{r['ensemble_acc']:.3f} [{r['ensemble_ci95'][0]:.3f}, {r['ensemble_ci95'][1]:.3f}]"
            if "ensemble_acc" in r
            else "-"
        )
        wall = f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] else "-"
        print(
            f"| {r['method']} | {r['run']} | {r['clean_acc_10k']:.4f} | {r['pgd20_acc_10k']:.4f} | {ensemble} | "
            f"{r['registered_epoch']} of {r['epochs']} | {wall} | {r['train_s'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    main()
