"""timm ``resnet18``: ``optimizer.step()`` time of spread-SGD with filter sparsity against torch's SGD (CPU).

The model (``timm.create_model("resnet18", num_classes=10)``) gets its gradients from one backward pass on a batch of
4 images 64x64; then each optimizer's ``step()`` is timed, all of them in turns (one step each per round), after a
first step timed apart (where the compiled CPU step compiles). SGD with momentum 0.9 everywhere. Spread's rows:

* ``row, one group``: every weight of two or more dims (convolutions, the classifier) in one sparse group with
  ``sparsity="row"`` (filters), the rest dense; ``fused=None`` takes the compiled CPU step (the group has 11M
  elements), ``fused=False`` the split path (torch's per-tensor SGD on the factors, then the exact-zero pass);
* ``param_groups(output, coupled)``: :func:`spread_optim.param_groups` with ``sparsity="output"``: every conv that a
  BatchNorm follows is coupled to it (the BatchNorm's scale and shift carry the sparsity, the conv stays dense),
  which is what the pruning example trains.

    python benchmarks/resnet_step.py            # needs timm (the "examples" extra)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from spread_optim import SpreadSGD, param_groups


def model_with_grads(seed: int = 0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    model(torch.randn(4, 3, 64, 64)).sum().backward()
    return model


def filter_groups(model, kappa: float) -> list[dict]:
    weights = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": weights, "kappa": kappa, "sparsity": "row"}, {"params": rest}]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--kappa", type=float, default=1e-5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    sgd = dict(lr=0.01, momentum=0.9)
    optimizers = {
        "torch SGD foreach": torch.optim.SGD(model_with_grads().parameters(), foreach=True, **sgd),
        "torch SGD fused": torch.optim.SGD(model_with_grads().parameters(), fused=True, **sgd),
        "spread row, one group (fused=None)": SpreadSGD(filter_groups(model_with_grads(), args.kappa), **sgd),
        "spread row, one group (fused=False)": SpreadSGD(filter_groups(model_with_grads(), args.kappa), fused=False, **sgd),
        "spread param_groups(output, coupled)": SpreadSGD(param_groups(model_with_grads(), args.kappa, sparsity="output"), **sgd),
    }
    first, times = {}, {name: [] for name in optimizers}
    for name, opt in optimizers.items():
        t0 = time.perf_counter()
        opt.step()
        first[name] = time.perf_counter() - t0
    for round_ in range(args.rounds):
        for name, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            if round_ >= 3:
                times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    anchor = medians["torch SGD foreach"]
    print(f"torch {torch.__version__}, 1 thread; median of {args.rounds - 3} steps after 3, in turns")
    print("| optimizer | ms/step | x torch SGD foreach | first step s |")
    print("| --- | ---: | ---: | ---: |")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.1f} | {ms / anchor:.2f} | {first[name]:.2f} |")
    return {"ms": medians, "first_s": first}


if __name__ == "__main__":
    main()
