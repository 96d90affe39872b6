"""advtrain's `standard` cascade vs the reference AutoAttack (fra31/auto-attack), stage by stage.

    # train and save the two Fashion-MNIST models once (in process, no Ray)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/autoattack_gap.py train --method fgsm_rs --out /tmp/aa-gap/fgsm_rs
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/autoattack_gap.py train --method pgd_at --out /tmp/aa-gap/pgd_at
    # compare (AutoAttack's source tree exported from github:fra31/auto-attack; imported, never copied)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/autoattack_gap.py compare --autoattack-src /tmp/autoattack-src \
        --model-folder fgsm_rs=/tmp/aa-gap/fgsm_rs --model-folder pgd_at=/tmp/aa-gap/pgd_at
    # diagnose: our stages with other seeds on the examples only AutoAttack broke
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/autoattack_gap.py reseed --model-folder fgsm_rs=/tmp/aa-gap/fgsm_rs

`compare` runs, on the first --num-examples test examples at Linf eps 0.1, (i) advtrain's `standard` protocol
(APGD-CE 100, APGD-T 100 x 9, FAB-T 100 x 9, Square 5000, each on the points still robust) through
`pipeline.evaluate.evaluate_examples`, and (ii) AutoAttack(version='standard') with the same cascade, one
attack at a time (`attacks_to_run`, version='custom', the standard version's settings) so each stage's
robust mask is recorded. Prints per-stage robust accuracy side by side and, per stage, the examples one side
broke and the other did not. Results: benchmarks/results/autoattack_gap.json (merged per model).

`--device cuda` (every command; default cpu) trains, attacks and runs AutoAttack on the GPU: the reference
takes a device too, so both sides run on the same one, in fp32 without TF32 as `advtrain evaluate` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import torch
from devices import add_device_option, describe, elapsed, synchronize
from torch import nn

RESULTS = Path(__file__).parent / "results" / "autoattack_gap.json"
DATA = Path(__file__).parents[1] / "data" / "fashion-mnist"
CONFIGS = Path(__file__).parents[1] / "jobs" / "configs"
STAGES = [("apgd_ce", "apgd-ce"), ("apgd_t", "apgd-t"), ("fab_t", "fab-t"), ("square", "square")]


def train(args: argparse.Namespace) -> None:
    from pipeline.config import load_config
    from pipeline.model_folder import save_weights
    from pipeline.training import fit_in_process

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    toml = {"fgsm_rs": "fashion_mnist_fast_short.toml", "pgd_at": "fashion_mnist_pgd.toml"}[args.method]
    overrides = [f"data.path={DATA}", *args.set]
    config = load_config(CONFIGS / toml, overrides)
    started = time.perf_counter()
    model, arch, _ = fit_in_process(config, device=args.device)
    minutes = (time.perf_counter() - started) / 60
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model.eval(), arch, out)
    (out / "training.json").write_text(json.dumps({"config": toml, "overrides": overrides, "minutes": minutes}))
    print(f"{args.method}: trained in {minutes:.1f} min -> {out}")


def load_models(specs: list[str], device: torch.device) -> dict[str, nn.Module]:
    from pipeline.evaluate import evaluation_numerics
    from pipeline.model_folder import load_folder

    if device.type == "cuda":
        evaluation_numerics()  # fp32 without TF32, as `advtrain evaluate` runs on a GPU (both sides here)

    models = {}
    for spec in specs:
        name, _, folder = spec.partition("=")
        if not folder:
            raise ValueError(f"--model-folder wants NAME=FOLDER, got '{spec}'")
        models[name] = load_folder(folder)[0].eval().to(device)
    return models


def ours(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seed: int) -> dict:
    """advtrain's cascade on the model's device; masks come back on the CPU."""
    from pipeline.evaluate import evaluate_examples, model_device

    device = model_device(model, x.device)
    synchronize(device)
    started = time.perf_counter()
    result = evaluate_examples(model, x, y, norm="linf", eps=eps, protocol="standard", seed=seed, chunk_size=len(y))
    return {
        "clean": result.clean_correct,
        "robust_after": {name: result.robust_after[name] for name, _ in STAGES},
        "seconds": {**result.seconds, "total": elapsed(started, device)},
    }


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, seed: int, src: str) -> dict:
    """The reference cascade, one attack at a time on what is still robust, so each stage is recorded.
    Same settings as AutoAttack(version='standard').set_version('standard') (asserted below). Runs on the
    device of `x` (the model's); masks come back on the CPU."""
    if src not in sys.path:
        sys.path.insert(0, src)
    from autoattack import AutoAttack

    device = x.device
    adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=device, verbose=False)
    assert adversary.attacks_to_run == [aa for _, aa in STAGES]
    assert adversary.apgd.n_restarts == 1 and adversary.apgd_targeted.n_target_classes == 9
    assert adversary.fab.n_target_classes == 9 and adversary.square.n_queries == 5000
    with torch.no_grad():
        robust = model(x).argmax(1) == y
    out = {"clean": robust.clone(), "robust_after": {}, "seconds": {}}
    adversary.attacks_to_run, adversary.version = [], "custom"
    for ours_name, aa_name in STAGES:
        started = time.perf_counter()
        idx = robust.nonzero().squeeze(1)
        if idx.numel():
            adversary.attacks_to_run = [aa_name]
            x_adv = adversary.run_standard_evaluation(x[idx], y[idx], bs=len(y))
            with torch.no_grad():
                robust[idx[model(x_adv).argmax(1) != y[idx]]] = False
        out["robust_after"][ours_name] = robust.to("cpu", copy=True)  # `robust` changes in the next stage
        out["seconds"][ours_name] = elapsed(started, device)
    out["clean"] = out["clean"].cpu()
    out["seconds"]["total"] = sum(out["seconds"].values())
    return out


def stage_table(a: dict, b: dict, n: int) -> list[dict]:
    rows = [{"stage": "clean", "ours": float(a["clean"].sum()) / n, "autoattack": float(b["clean"].sum()) / n}]
    for name, _ in STAGES:
        ra, rb = a["robust_after"][name], b["robust_after"][name]
        rows.append(
            {
                "stage": name,
                "ours": float(ra.sum()) / n,
                "autoattack": float(rb.sum()) / n,
                "only_autoattack_broke": (ra & ~rb).nonzero().squeeze(1).tolist(),
                "only_ours_broke": (rb & ~ra).nonzero().squeeze(1).tolist(),
            }
        )
    return rows


def first_breaker(side: dict, i: int) -> str | None:
    if not bool(side["clean"][i]):
        return "clean-wrong"
    return next((name for name, _ in STAGES if not bool(side["robust_after"][name][i])), None)


def compare(args: argparse.Namespace) -> None:
    from pipeline.data import load_split

    if args.square_rescale_schedule:
        # The behaviour before this benchmark's fix: Square's p schedule stretched over the budget.
        from functools import partial

        from pipeline.attacks import ATTACKS, AttackSpec, square

        ATTACKS["square"] = AttackSpec(partial(square, rescale_schedule=True))
    x, y = load_split(DATA, "test", max_examples=args.num_examples)
    x, y = x.to(args.device), y.to(args.device)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    label = args.label or ("square_rescaled" if args.square_rescale_schedule else "")
    for name, model in load_models(args.model_folder, args.device).items():
        for seed in args.seeds:
            a = ours(model, x, y, eps=args.eps, seed=seed)
            b = autoattack(model, x, y, eps=args.eps, seed=seed, src=args.autoattack_src)
            table = stage_table(a, b, len(y))
            print(f"\n{name}, seed {seed} ({len(y)} examples, Linf eps {args.eps}):")
            print(f"  {'stage':8s} {'ours':>6s} {'AA':>6s}  only AA broke / only ours broke")
            for row in table:
                extra = (
                    f"  {row['only_autoattack_broke']} / {row['only_ours_broke']}" if "only_ours_broke" in row else ""
                )
                print(f"  {row['stage']:8s} {row['ours']:6.3f} {row['autoattack']:6.3f}{extra}")
            final_a, final_b = a["robust_after"]["square"], b["robust_after"]["square"]
            diffs = {
                i: {"ours": first_breaker(a, i), "autoattack": first_breaker(b, i)}
                for i in (final_a ^ final_b).nonzero().squeeze(1).tolist()
            }
            print(
                f"  end: only AA broke {int((final_a & ~final_b).sum())}, only ours {int((final_b & ~final_a).sum())}"
            )
            print(f"  seconds: ours {a['seconds']['total']:.0f}, AutoAttack {b['seconds']['total']:.0f}")
            results.setdefault(name, {})[f"{label}seed{seed}"] = {
                "num_examples": len(y),
                "eps": args.eps,
                "stages": table,
                "final_disagreements": diffs,
                "per_example": {
                    side: {k: v.int().tolist() for k, v in {"clean": r["clean"], **r["robust_after"]}.items()}
                    for side, r in (("ours", a), ("autoattack", b))
                },
                "seconds": {"ours": a["seconds"], "autoattack": b["seconds"]},
            }
            RESULTS.parent.mkdir(exist_ok=True)
            meta = {
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "threads": 1,
                "device": describe(args.device),
            }
            results["_meta"] = meta
            RESULTS.write_text(json.dumps(results, indent=1))


def _aa_single(adversary, name: str, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """One of AutoAttack's attacks alone, as its cascade calls it (its own global-RNG seeding)."""
    if name == "apgd_ce":
        adversary.apgd.loss, adversary.apgd.seed = "ce", seed
        return adversary.apgd.perturb(x, y)
    if name == "apgd_t":
        adversary.apgd_targeted.seed = seed
        return adversary.apgd_targeted.perturb(x, y)
    adversary.square.seed = seed
    return adversary.square.perturb(x, y)


OUR_SINGLE = {
    "apgd_ce": {"num_steps": 100},
    "apgd_t": {"num_steps": 100, "num_target_classes": 9},
    "square": {"num_queries": 5000},
}


def _our_single(model, name: str, x, y, *, eps: float, seed: int, **extra) -> torch.Tensor:
    from pipeline.attacks import get_attack

    generator = torch.Generator(device=x.device).manual_seed(seed)
    return get_attack(name)(model, x, y, eps=eps, norm="linf", generator=generator, **OUR_SINGLE[name], **extra)


def _broken(model, x_adv, y) -> torch.Tensor:
    """Which examples `x_adv` fools the model on, as a CPU mask (counted on the host)."""
    with torch.no_grad():
        return (model(x_adv).argmax(1) != y).cpu()


def _variant(side: str, model, adversary, stage: str, x, y, seed: int, eps: float) -> torch.Tensor:
    if side == "autoattack":
        return _aa_single(adversary, stage, x, y, seed)
    extra = {"ours_rescaled": {"rescale_schedule": True}, "ours_unrescaled": {"rescale_schedule": False}}
    return _our_single(model, stage, x, y, eps=eps, seed=seed, **extra.get(side, {}))


def reseed(args: argparse.Namespace) -> None:
    """Each attack alone, with --num-seeds seeds on each side, on (a) the examples where the seed-0
    cascades disagree and (b) the population it faces in the cascade (the points both seed-0 cascades
    left robust before it). Per-example break counts show random-init luck; population counts show a
    systematic gap."""
    if args.autoattack_src not in sys.path:
        sys.path.insert(0, args.autoattack_src)
    from autoattack import AutoAttack

    from pipeline.data import load_split

    x, y = load_split(DATA, "test", max_examples=args.num_examples)
    x, y = x.to(args.device), y.to(args.device)  # indexed below by CPU index tensors, which CUDA accepts
    results = json.loads(RESULTS.read_text())
    for name, model in load_models(args.model_folder, args.device).items():
        record = results[name]["seed0"]
        per = {
            side: {k: torch.tensor(v, dtype=torch.bool) for k, v in d.items()}
            for side, d in record["per_example"].items()
        }
        adversary = AutoAttack(model, norm="Linf", eps=args.eps, version="standard", device=args.device, verbose=False)
        disagree = sorted(int(i) for i in record["final_disagreements"])
        out = results[name].setdefault("reseed", {})
        before = {"apgd_ce": "clean", "apgd_t": "apgd_ce", "square": "fab_t"}
        for stage in args.stages:
            start = per["ours"][before[stage]] & per["autoattack"][before[stage]]
            pop = start.nonzero().squeeze(1)
            focus = torch.tensor([i for i in disagree if bool(start[i])], dtype=torch.long)
            row = {"population": len(pop), "focus": focus.tolist()}
            sides = ["ours_rescaled", "ours_unrescaled"] if stage == "square" else ["ours"]
            for side in [*sides, "autoattack"]:
                started = time.perf_counter()
                focus_counts = torch.zeros(len(focus), dtype=torch.long)
                pop_broken = []
                for seed in range(args.num_seeds):
                    if len(focus):
                        x_adv = _variant(side, model, adversary, stage, x[focus], y[focus], seed, args.eps)
                        focus_counts += _broken(model, x_adv, y[focus]).long()
                    if seed < args.population_seeds:
                        x_adv = _variant(side, model, adversary, stage, x[pop], y[pop], seed, args.eps)
                        pop_broken.append(int(_broken(model, x_adv, y[pop]).sum()))
                row[side] = {
                    "focus_breaks_of_seeds": focus_counts.tolist(),
                    "population_broken_by_seed": pop_broken,
                    "seconds": elapsed(started, args.device),
                }
                print(
                    f"{name} {stage:8s} {side:15s} focus {focus.tolist()} broken in {focus_counts.tolist()} "
                    f"of {args.num_seeds} seeds; population {len(pop)}: broken {pop_broken}",
                    flush=True,
                )
            out[stage] = row
            RESULTS.write_text(json.dumps(results, indent=1))


def stagewise(args: argparse.Namespace) -> None:
    """The cheap version of `compare` for a busy CPU: each attack alone on a fixed population, several seeds
    per side. APGD-CE on every clean-correct example; then Square (ours with and without the rescaled
    p schedule, and AutoAttack's) on the first --square-max points that every APGD-CE run left robust."""
    if args.autoattack_src not in sys.path:
        sys.path.insert(0, args.autoattack_src)
    from autoattack import AutoAttack

    from pipeline.data import load_split

    x, y = load_split(DATA, "test", max_examples=args.num_examples)
    x, y = x.to(args.device), y.to(args.device)  # indexed below by CPU index tensors, which CUDA accepts
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name, model in load_models(args.model_folder, args.device).items():
        adversary = AutoAttack(model, norm="Linf", eps=args.eps, version="standard", device=args.device, verbose=False)
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).cpu()
        out = results.setdefault(name, {}).setdefault("stagewise", {"clean": int(clean.sum()), "n": len(y)})
        robust_all = clean.clone()
        for stage, sides, population in (("apgd_ce", ["ours", "autoattack"], clean.nonzero().squeeze(1)),):
            out[stage] = {"population": len(population)}
            for side in sides:
                for seed in args.seeds:
                    started = time.perf_counter()
                    broken = _broken(
                        model,
                        _variant(side, model, adversary, stage, x[population], y[population], seed, args.eps),
                        y[population],
                    )
                    robust_all[population[broken]] = False
                    out[stage][f"{side}/seed{seed}"] = population[broken].tolist()
                    print(
                        f"{name} {stage} {side} seed {seed}: broke {int(broken.sum())} of {len(population)} "
                        f"-> robust {(int(clean.sum()) - int(broken.sum())) / len(y):.3f} "
                        f"({elapsed(started, args.device):.0f}s)",
                        flush=True,
                    )
                    RESULTS.write_text(json.dumps(results, indent=1))
        population = robust_all.nonzero().squeeze(1)[: args.square_max]
        out["square"] = {"population": population.tolist()}
        for side in args.square_sides:
            for seed in args.square_seeds:
                started = time.perf_counter()
                broken = _broken(
                    model,
                    _variant(side, model, adversary, "square", x[population], y[population], seed, args.eps),
                    y[population],
                )
                out["square"][f"{side}/seed{seed}"] = population[broken].tolist()
                print(
                    f"{name} square {side} seed {seed}: broke {int(broken.sum())} of {len(population)} "
                    f"({elapsed(started, args.device):.0f}s)",
                    flush=True,
                )
                RESULTS.write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train")
    p.add_argument("--method", choices=["fgsm_rs", "pgd_at"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], help="dotted override, e.g. run.epochs=6")
    add_device_option(p)
    p = sub.add_parser("compare")
    p.add_argument("--autoattack-src", required=True, help="a checkout of github:fra31/auto-attack")
    p.add_argument("--model-folder", action="append", required=True, help="NAME=FOLDER (save_weights output)")
    p.add_argument("--num-examples", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--square-rescale-schedule", action="store_true", help="Square as before the fix")
    p.add_argument("--label", default="", help="prefix of the result keys (default: none)")
    add_device_option(p)
    p = sub.add_parser("reseed")
    p.add_argument("--autoattack-src", required=True)
    p.add_argument("--model-folder", action="append", required=True)
    p.add_argument("--num-examples", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--stages", nargs="+", default=["apgd_ce", "apgd_t", "square"])
    p.add_argument("--num-seeds", type=int, default=10, help="seeds on the disagreeing examples")
    p.add_argument("--population-seeds", type=int, default=3, help="seeds on the whole population")
    add_device_option(p)
    p = sub.add_parser("stagewise")
    p.add_argument("--autoattack-src", required=True)
    p.add_argument("--model-folder", action="append", required=True)
    p.add_argument("--num-examples", type=int, default=500)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--square-max", type=int, default=100)
    p.add_argument("--square-seeds", type=int, nargs="+", default=[0])
    p.add_argument("--square-sides", nargs="+", default=["ours_unrescaled", "autoattack", "ours_rescaled"])
    add_device_option(p)
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"train": train, "compare": compare, "reseed": reseed, "stagewise": stagewise}[args.command](args)


if __name__ == "__main__":
    main()
