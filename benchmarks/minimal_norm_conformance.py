"""Our minimal-norm attacks vs foolbox 3.3.4 and IBM ART 1.20: same model, same examples, same settings,
one process, one run.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/minimal_norm_conformance.py \
        --json benchmarks/results/minimal_norm_conformance.json

Trains the small_cnn digits models the tests use, in process (undefended: `standard`, 8 epochs; PGD-AT:
`pgd_at`, Linf eps 0.2, --at-epochs epochs), takes the first --num-examples test examples each model
classifies correctly, and runs every attack family on them, ours (`get_attack(name)`, eps=math.inf)
beside each reference at matched settings:

| family        | ours (`get_attack`)                  | foolbox 3.3.4          | ART 1.20.1                  |
|---------------|--------------------------------------|------------------------|-----------------------------|
| cw_l2         | cw_l2: S steps x 9, c0 1e-3, lr 0.01 | L2CarliniWagnerAttack  | (too slow: see cw_l2_art)   |
| cw_l2_art     | the same at --steps-cw-art steps     | the same               | CarliniL2Method, the same   |
| deepfool_l2   | deepfool: 50 steps, overshoot 0.02,  | L2DeepFoolAttack       | DeepFool(max_iter 50,       |
|               | 10 candidates                        |                        | epsilon 0.02, nb_grads 10)  |
| deepfool_linf | deepfool, norm linf, the same        | LinfDeepFoolAttack     | (ART's DeepFool is L2 only) |
| fmn_l2        | fmn: S steps, alpha 1 -> 0.01,       | L2FMNAttack            | (none)                      |
|               | gamma 0.05 -> 0.001                  |                        |                             |
| fmn_linf      | fmn, norm linf, the same             | LInfFMNAttack          | (none)                      |

Every side's answer is checked here, identically: an example counts as broken only where
model(x_adv).argmax != y, and its norm is computed from x_adv - x in pixel space. Per side: success rate,
median and mean norm over its own successes, the median over the examples every side of the family
broke ("common"), and the median over all examples with inf for a failure ("median minimal norm": the
number the bar is on, since success rates can differ). Ratios: ours / best reference (median norm,
bar <= 1.02) and ours / fastest reference (seconds, bar <= 0.5). Where foolbox's C&W finds nothing it
returns the all-zero image, which the model misclassifies: it counts as broken (it is an adversarial),
and the rows also give the count of such answers and the ratio with them counted as failures
("searched"). Each side's forward calls and the examples they carried are counted (a hook on the
model's first child), so a time ratio can be read against the work each side did. In the JSON, inf
and nan (a median over failures, a ratio of two) are null.

The defaults (200 examples, C&W 1000 steps x 9, FMN 1000 steps, ART's C&W at 100 steps on 32
examples, both models) took about 26 min with one thread on a shared 2-core CPU; --num-examples 100
roughly halves it. The paper's C&W budget (10000 steps) is out of reach here: --steps-cw 10000.

Where the references' settings cannot be matched exactly (their documented behaviour, not ours):
ART's C&W replaces Adam by a line search (max_halving 5, max_doubling 5) and has no early abort; ART's
DeepFool applies the overshoot once at the end, not at every step, and adds no 1e-4 to the step;
foolbox's L2FMNAttack never projects onto its eps_k (its `project` scales by norms / norms = 1).

`--device cuda` trains and attacks on the GPU, and every side runs there: foolbox's PyTorchModel and ART's
PyTorchClassifier are given the same device (ART still moves each batch through numpy: its design, and
part of its time). Norms, masks and the summary are computed on the CPU from each side's answer.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from devices import add_device_option, describe, synchronize
from torch import nn

NORM_BAR = 1.02
TIME_BAR = 0.5
DEEPFOOL = {"num_steps": 50, "overshoot": 0.02, "num_candidates": 10}  # the paper's (and foolbox's defaults)
CW = {"binary_search_steps": 9, "initial_const": 1e-3, "learning_rate": 0.01, "confidence": 0.0}
FMN = {"alpha_init": 1.0, "gamma_init": 0.05}  # alpha_final = alpha_init / 100, gamma_final 0.001 on both sides

Runner = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One comparison: attack family, norm, step budget, {side: runner} with `ours` first, and how many of
    the model's examples it runs on (0: all)."""

    name: str
    norm: str
    steps: int
    sides: dict[str, Runner]
    max_examples: int = 0


def train_model(data: Path, method: str, epochs: int, device: torch.device, seed: int = 0) -> nn.Module:
    """The small_cnn digits model of tests/conftest.py `train_in_process`, in eval mode on `device`."""
    from pipeline.config import config_from_dict
    from pipeline.training import fit_in_process

    config = config_from_dict(
        {
            "run": {"epochs": epochs, "seed": seed, "keep_best": False},
            "data": {"path": str(data), "batch_size": 64},
            "attack": {"eps": 0.2, "num_steps": 7},
            "method": {"name": method, "co_guard": False},
            "schedule": {"eps_ramp": "linear", "eps_ramp_epochs": 5},
            "optim": {"name": "adam", "lr": 0.001 if method != "standard" else 0.002, "weight_decay": 0.0},
            "validation": {"num_examples": 32, "num_steps": 2},
        }
    )
    return fit_in_process(config, device=device)[0].eval().to(device)


def correct_examples(model: nn.Module, data: Path, num_examples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num_examples` test examples the model classifies correctly, on the model's device."""
    from pipeline.data import load_split

    x, y = load_split(data, "test")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    return x[keep][:num_examples].contiguous(), y[keep][:num_examples].contiguous()


def norms(x: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    delta = (x_adv - x).flatten(1).double()
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def measure(run: Runner, model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str) -> dict:
    """Runs one side on the device of `x` (the model's); returns seconds, success mask, per-example norms
    (inf where it failed), the model's forward calls and the examples they carried (the attack's cost in
    model passes), and how many answers are the all-zero image (foolbox's C&W returns that where it found
    nothing: a valid but unsearched adversarial). Every returned tensor is on the CPU."""
    passes = {"calls": 0, "examples": 0}

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        passes["calls"] += 1
        passes["examples"] += int(inputs[0].shape[0])

    # The first child, not the model: ART's PyTorchClassifier calls the model's children one by one.
    handle = next(model.children(), model).register_forward_hook(count)
    synchronize(x.device)
    started = time.perf_counter()
    try:
        x_adv = run(model, x, y)
    finally:
        synchronize(x.device)  # a side's answer may still be queued on the GPU
        seconds = time.perf_counter() - started
        handle.remove()
    x_adv = torch.as_tensor(np.asarray(x_adv) if not isinstance(x_adv, torch.Tensor) else x_adv).float()
    with torch.no_grad():
        broken = model(x_adv.to(x.device)).argmax(1) != y
    # Everything after the model's verdict is host-side bookkeeping.
    x, x_adv, broken = x.cpu(), x_adv.cpu(), broken.cpu()
    in_box = bool(x_adv.min() >= 0 and x_adv.max() <= 1)
    size = torch.where(broken, norms(x, x_adv, norm), torch.tensor(math.inf, dtype=torch.float64))
    zero = (x_adv.flatten(1) == 0).all(1) & (x.flatten(1) != 0).any(1)
    return {"seconds": seconds, "broken": broken, "norms": size, "in_box": in_box, "zero_image": zero, **passes}


def ours(name: str, norm: str, **options) -> Runner:
    from pipeline.attacks import get_attack

    attack = get_attack(name)
    return lambda model, x, y: attack(model, x, y, eps=math.inf, norm=norm, **options)


def foolbox_side(attack) -> Runner:
    import foolbox

    def run(model, x, y):
        # foolbox's default device is cuda:0 wherever CUDA exists: name the model's (that of x).
        fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=x.device)
        raw, _, _ = attack(fmodel, x, y, epsilons=None)
        return raw

    return run


def art_side(make) -> Runner:
    from art.estimators.classification import PyTorchClassifier

    def run(model, x, y):
        classifier = PyTorchClassifier(
            model=model,
            loss=nn.CrossEntropyLoss(),
            input_shape=tuple(x.shape[1:]),
            nb_classes=10,
            clip_values=(0.0, 1.0),
            # ART's default is "gpu" wherever CUDA exists; "gpu" is the current CUDA device.
            device_type="gpu" if x.device.type == "cuda" else "cpu",
        )
        return make(classifier, len(y)).generate(x.cpu().numpy(), y.cpu().numpy())

    return run


def families(steps_cw: int, steps_fmn: int, steps_cw_art: int, art_cw_examples: int) -> list[Family]:
    """Every comparison; `ours` first in each."""
    import foolbox.attacks as fa
    from art.attacks.evasion import CarliniL2Method, DeepFool

    def cw_fb(steps: int):
        return fa.L2CarliniWagnerAttack(
            binary_search_steps=CW["binary_search_steps"],
            steps=steps,
            stepsize=CW["learning_rate"],
            confidence=CW["confidence"],
            initial_const=CW["initial_const"],
            abort_early=True,
        )

    def cw_art(classifier, n: int):
        return CarliniL2Method(
            classifier,
            confidence=CW["confidence"],
            learning_rate=CW["learning_rate"],
            binary_search_steps=CW["binary_search_steps"],
            max_iter=steps_cw_art,
            initial_const=CW["initial_const"],
            batch_size=n,
            verbose=False,
        )

    def deepfool_art(classifier, n: int):
        return DeepFool(
            classifier,
            max_iter=DEEPFOOL["num_steps"],
            epsilon=DEEPFOOL["overshoot"],
            nb_grads=DEEPFOOL["num_candidates"],
            batch_size=n,
            verbose=False,
        )

    df_fb = {
        "steps": DEEPFOOL["num_steps"],
        "candidates": DEEPFOOL["num_candidates"],
        "overshoot": DEEPFOOL["overshoot"],
    }
    fmn_fb = {"steps": steps_fmn, "max_stepsize": FMN["alpha_init"], "gamma": FMN["gamma_init"]}
    return [
        Family(
            "cw_l2",
            "l2",
            steps_cw,
            {"ours": ours("cw_l2", "l2", num_steps=steps_cw, **CW), "foolbox": foolbox_side(cw_fb(steps_cw))},
        ),
        # ART's C&W costs ~20x ours per step (a line search of up to 10 forward passes and two class
        # gradients per step, no early abort): a smaller budget, all three sides on the same subset.
        Family(
            "cw_l2_art",
            "l2",
            steps_cw_art,
            {
                "ours": ours("cw_l2", "l2", num_steps=steps_cw_art, **CW),
                "foolbox": foolbox_side(cw_fb(steps_cw_art)),
                "art": art_side(cw_art),
            },
            art_cw_examples,
        ),
        Family(
            "deepfool_l2",
            "l2",
            DEEPFOOL["num_steps"],
            {
                "ours": ours("deepfool", "l2", **DEEPFOOL),
                "foolbox": foolbox_side(fa.L2DeepFoolAttack(loss="logits", **df_fb)),
                "art": art_side(deepfool_art),
            },
        ),
        Family(
            "deepfool_linf",
            "linf",
            DEEPFOOL["num_steps"],
            {
                "ours": ours("deepfool", "linf", **DEEPFOOL),
                "foolbox": foolbox_side(fa.LinfDeepFoolAttack(loss="logits", **df_fb)),
            },
        ),
        Family(
            "fmn_l2",
            "l2",
            steps_fmn,
            {"ours": ours("fmn", "l2", num_steps=steps_fmn, **FMN), "foolbox": foolbox_side(fa.L2FMNAttack(**fmn_fb))},
        ),
        Family(
            "fmn_linf",
            "linf",
            steps_fmn,
            {
                "ours": ours("fmn", "linf", num_steps=steps_fmn, **FMN),
                "foolbox": foolbox_side(fa.LInfFMNAttack(**fmn_fb)),
            },
        ),
    ]


def warm_up(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One tiny call of each library, untimed, so no side pays for first-call set-up (imports, eagerpy)."""
    for family in families(2, 2, 2, 0):
        if family.name in ("cw_l2_art", "deepfool_l2"):
            for run in family.sides.values():
                run(model, x[:2], y[:2])


def summarise(family: Family, results: dict[str, dict]) -> dict:
    """The rows of one family plus its ratios and verdicts."""
    common = torch.stack([r["broken"] for r in results.values()]).all(0)
    sides = {}
    for side, r in results.items():
        own = r["norms"][r["broken"]].numpy()
        sides[side] = {
            "seconds": r["seconds"],
            "success_rate": float(r["broken"].float().mean()),
            "median_norm_own": float(np.median(own)) if len(own) else math.inf,
            "mean_norm_own": float(own.mean()) if len(own) else math.inf,
            "median_norm_common": float(np.median(r["norms"][common].numpy())) if bool(common.any()) else math.nan,
            "median_norm_all": float(np.median(r["norms"].numpy())),  # inf for failures
            # The same with all-zero answers (foolbox C&W's "nothing found") counted as failures.
            "median_norm_all_searched": float(np.median(torch.where(r["zero_image"], math.inf, r["norms"]).numpy())),
            "in_box": r["in_box"],
            "zero_image_answers": int(r["zero_image"].sum()),
            "forward_calls": r["calls"],
            "forward_examples": r["examples"],
        }
    refs = {k: v for k, v in sides.items() if k != "ours"}
    best = min(refs, key=lambda k: refs[k]["median_norm_all"])
    fastest = min(refs, key=lambda k: refs[k]["seconds"])
    norm_ratio = _ratio(sides["ours"]["median_norm_all"], refs[best]["median_norm_all"])
    common_ratio = _ratio(sides["ours"]["median_norm_common"], min(r["median_norm_common"] for r in refs.values()))
    searched_ratio = _ratio(
        sides["ours"]["median_norm_all_searched"], min(r["median_norm_all_searched"] for r in refs.values())
    )
    time_ratio = sides["ours"]["seconds"] / refs[fastest]["seconds"]
    return {
        "family": family.name,
        "norm": family.norm,
        "steps": family.steps,
        "num_common": int(common.sum()),
        "sides": sides,
        "best_reference": best,
        "fastest_reference": fastest,
        "norm_ratio": norm_ratio,
        "norm_ratio_common": common_ratio,
        "norm_ratio_searched": searched_ratio,
        "time_ratio": time_ratio,
        "norm_pass": norm_ratio <= NORM_BAR,
        "time_pass": time_ratio <= TIME_BAR,
    }


def _ratio(a: float, b: float) -> float:
    if math.isinf(a) and math.isinf(b):
        return math.nan
    return a / b if b > 0 else math.inf


def json_safe(value):
    """inf and nan as null (strict JSON, as the evaluation records write a median nothing reached)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_family(label: str, row: dict) -> None:
    print(
        f"\n[{label}] {row['family']} ({row['norm']}, {row['steps']} steps), {row['num_examples']} examples, "
        f"{row['num_common']} broken by every side"
    )
    header = ("side", "success", "median", "mean", "common", "all(inf)", "seconds", "fwd calls", "fwd examples")
    print("  " + " ".join(f"{h:>9s}" if i else f"{h:8s}" for i, h in enumerate(header)))
    for side, s in row["sides"].items():
        zero = f"  ({s['zero_image_answers']} all-zero answers)" if s["zero_image_answers"] else ""
        print(
            f"  {side:8s} {s['success_rate']:9.3f} {s['median_norm_own']:9.4f} {s['mean_norm_own']:9.4f} "
            f"{s['median_norm_common']:9.4f} {s['median_norm_all']:9.4f} {s['seconds']:9.2f} "
            f"{s['forward_calls']:9d} {s['forward_examples']:9d}{zero}"
        )
    print(
        f"  norm ours/{row['best_reference']} = {row['norm_ratio']:.3f} (common {row['norm_ratio_common']:.3f}, "
        f"all-zero answers as failures {row['norm_ratio_searched']:.3f}) "
        f"{'PASS' if row['norm_pass'] else 'FAIL'} (<= {NORM_BAR});  time ours/{row['fastest_reference']} = "
        f"{row['time_ratio']:.3f} {'PASS' if row['time_pass'] else 'FAIL'} (<= {TIME_BAR})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="prepared digits folder (default: prepare one in a temp dir)")
    parser.add_argument("--num-examples", type=int, default=200)
    parser.add_argument("--steps-cw", type=int, default=1000, help="C&W steps per search step (paper: 10000)")
    parser.add_argument("--steps-cw-art", type=int, default=100, help="C&W steps for the comparison with ART")
    parser.add_argument("--art-cw-examples", type=int, default=32, help="examples for the comparison with ART's C&W")
    parser.add_argument("--steps-fmn", type=int, default=1000, help="FMN steps (the paper's budget: 1000)")
    parser.add_argument("--models", default="undefended,pgd_at", help="comma list of undefended, pgd_at")
    parser.add_argument("--at-epochs", type=int, default=25, help="PGD-AT epochs (tests/conftest.py: 25)")
    parser.add_argument("--families", default="cw_l2,cw_l2_art,deepfool_l2,deepfool_linf,fmn_l2,fmn_linf")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the rows, settings and machine here")
    add_device_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = Path(args.data) if args.data else Path(tempfile.mkdtemp()) / "digits"
    if not (data / "metadata.json").exists():
        from pipeline.data import prepare_digits

        prepare_digits(data)
    recipes = {"undefended": ("standard", 8), "pgd_at": ("pgd_at", args.at_epochs)}
    chosen = [m for m in args.models.split(",") if m]
    wanted = [f for f in args.families.split(",") if f]
    rows = []
    print(
        f"threads {torch.get_num_threads()}  cpu {cpu_model()}  flags {','.join(cpu_flags())}  "
        f"device {describe(args.device)}"
    )
    for label in chosen:
        method, epochs = recipes[label]
        started = time.perf_counter()
        model = train_model(data, method, epochs, args.device)
        x, y = correct_examples(model, data, args.num_examples)
        seconds = time.perf_counter() - started
        print(f"\nmodel {label}: {method}, {epochs} epochs, trained in {seconds:.1f} s; {len(y)} examples")
        warm_up(model, x, y)
        for family in families(args.steps_cw, args.steps_fmn, args.steps_cw_art, args.art_cw_examples):
            if family.name not in wanted:
                continue
            xs, ys = (x[: family.max_examples], y[: family.max_examples]) if family.max_examples else (x, y)
            results = {side: measure(run, model, xs, ys, family.norm) for side, run in family.sides.items()}
            row = {"model": label, "num_examples": len(ys), **summarise(family, results)}
            print_family(label, row)
            rows.append(row)
    if args.json:
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": {
                "arch": platform.machine(),
                "cpu": cpu_model(),
                "flags": cpu_flags(),
                "torch_threads": torch.get_num_threads(),
                "device": describe(args.device),
                "torch": torch.__version__,
                "foolbox": version("foolbox"),
                "adversarial-robustness-toolbox": version("adversarial-robustness-toolbox"),
            },
            "settings": {
                "num_examples": args.num_examples,
                "steps_cw": args.steps_cw,
                "steps_fmn": args.steps_fmn,
                "steps_cw_art": args.steps_cw_art,
                "art_cw_examples": args.art_cw_examples,
                "at_epochs": args.at_epochs,
                "cw": CW,
                "deepfool": DEEPFOOL,
                "fmn": FMN,
                "bars": {"norm_ratio": NORM_BAR, "time_ratio": TIME_BAR},
            },
            "command": "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python benchmarks/minimal_norm_conformance.py "
            + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json"),
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
