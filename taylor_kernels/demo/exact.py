"""The demo's exact-IG section: a ReLU version of the digits CNN, explained by
``rule="exact"`` (the sum over the linear regions each path crosses) and by Gauss-Legendre with
50 nodes (Captum's default rule and step count) on the same test images."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from taylor_kernels.demo import digits
from taylor_kernels.engine.chunking import quiet_threads


class DigitsReluCNN(digits.DigitsCNN):
    """:class:`~taylor_kernels.demo.digits.DigitsCNN` with ReLU instead of tanh:
    piecewise-linear, so integrated gradients are an exact finite sum."""

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = nn.functional.avg_pool2d(torch.relu(self.c2(h)), 2)
        return self.fc(h.flatten(1))


def compare(model: nn.Module, x: torch.Tensor) -> dict:
    """Exact IG and GL-50 IG (zero baseline, predicted class) of ``x`` in float64.

    Returns per image ``regions``, the relative completeness gaps of both, the GL-50 error
    ``max|IG_GL50 - IG_exact| / max|IG_exact|``, the attributions and the seconds of each."""
    import taylor_kernels as tk
    with torch.no_grad():
        pred = model(x).argmax(1)
        delta = (model(x) - model(torch.zeros_like(x))).gather(1, pred[:, None])[:, 0]
    t0 = time.perf_counter()
    exact = tk.integrated_gradients(model, x, target=pred, rule="exact")
    t1 = time.perf_counter()
    gl = tk.integrated_gradients(model, x, target=pred, steps=50)
    t2 = time.perf_counter()
    a_ex, a_gl = exact.attributions.flatten(1), gl.attributions.flatten(1)
    return {"pred": pred, "regions": exact.regions[:, 0],
            "exact_rel_gap": exact.gap.abs() / delta.abs(),
            "gl50_rel_gap": gl.gap.abs() / delta.abs(),
            "gl50_error": (a_gl - a_ex).abs().amax(1) / a_ex.abs().amax(1),
            "exact": exact.attributions, "gl50": gl.attributions,
            "exact_s": t1 - t0, "gl50_s": t2 - t1}


MAX_EPOCHS = 10  # the ReLU CNN is not cached: 10 epochs (seconds) give ~96% test accuracy


def exact_section(x_tr, y_tr, x_te, y_te, indices: list[int], out: Path, summary: dict,
                  epochs: int = MAX_EPOCHS) -> dict:
    """Train the ReLU CNN (``min(epochs, MAX_EPOCHS)`` epochs), compare exact IG with GL-50
    on the test images ``indices``, write ``out/digits_exact_ig.png``; returns the report
    section and stores the figures in ``summary["exact"]``."""
    from taylor_kernels.demo import plots
    t0 = time.perf_counter()
    with quiet_threads():
        model = digits.train(digits.TrainConfig(epochs=min(epochs, MAX_EPOCHS)), x_tr, y_tr,
                             arch=DigitsReluCNN)
    acc = digits.accuracy(model, x_te, y_te)
    train_s = time.perf_counter() - t0
    x = x_te[indices].double()
    res = compare(model.double(), x)
    examples = [{"index": i, "label": int(y_te[i]), "pred": int(res["pred"][j]),
                 "prob": float(torch.softmax(model(x[j:j + 1]), 1).max().detach()),
                 "image": x_te[i, 0],
                 "attr": {"exact IG": res["exact"][j, 0].detach(),
                          "GL-50 minus exact": (res["gl50"] - res["exact"])[j, 0].detach()},
                 "caption": {"exact IG": f"{int(res['regions'][j])} regions",
                             "GL-50 minus exact": f"max err {res['gl50_error'][j]:.1e}"}}
                for j, i in enumerate(indices)]
    png = plots.method_grid_figure(examples, ["exact IG", "GL-50 minus exact"],
                                   out / "digits_exact_ig.png",
                                   f"ReLU digits CNN (test accuracy {acc:.1%}): exact IG and the "
                                   "error of 50-node Gauss-Legendre")
    summary["exact"] = {
        "test_accuracy": acc, "train_s": train_s, "exact_s": res["exact_s"],
        "gl50_s": res["gl50_s"], "regions": res["regions"].tolist(),
        "exact_rel_gap": res["exact_rel_gap"].tolist(),
        "gl50_rel_gap": res["gl50_rel_gap"].tolist(), "gl50_error": res["gl50_error"].tolist()}
    print(f"exact IG (ReLU digits CNN, accuracy {acc:.1%}): regions {res['regions'].tolist()}, "
          f"worst relative gap {res['exact_rel_gap'].max():.1e} (GL-50: "
          f"{res['gl50_rel_gap'].max():.1e}, attribution error up to "
          f"{res['gl50_error'].max():.1e}); {res['exact_s']:.2f} s vs GL-50 {res['gl50_s']:.2f} s")
    return {"heading": "Exact integrated gradients of a ReLU CNN (rule='exact')",
            "text": f"The digits CNN with ReLU activations (test accuracy {acc:.1%}, trained in "
                    f"{train_s:.1f} s) is piecewise-linear: along each path from the zero "
                    "baseline its gradient changes only where a unit switches, so IG is a "
                    "finite sum over the regions crossed, exact to float64 rounding. Regions "
                    f"crossed per image: {res['regions'].tolist()}. Relative completeness gap "
                    f"|sum(IG) - (f(x) - f(0))| / |f(x) - f(0)|: exact rule at most "
                    f"{res['exact_rel_gap'].max():.1e}, Gauss-Legendre with 50 nodes (Captum's "
                    f"default) up to {res['gl50_rel_gap'].max():.1e}; GL-50's largest "
                    "attribution error relative to the largest exact attribution: up to "
                    f"{res['gl50_error'].max():.1e}. Seconds (float64): exact "
                    f"{res['exact_s']:.2f}, GL-50 {res['gl50_s']:.2f}.",
            "figures": [png]}
