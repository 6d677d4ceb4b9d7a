"""Family ``scale``: a transformer, training through attributions, several processes.

* ``minilm``: token attribution throughput (sentences/s) of all-MiniLM-L6-v2's similarity
  score: ``tk.layer_integrated_gradients`` on the word embeddings vs Captum's
  ``LayerIntegratedGradients`` at the same steps (Gauss-Legendre), one padded batch, with each
  of our calls' relative difference from Captum's attributions (skipped when the offline
  weights package is missing);
* ``dapr_step``: one DAPr training step (EG penalty with ``create_graph``, backward, Adam) on
  the two-moons MLP with ``tk.expected_gradients`` vs the same step written with plain
  autograd, vectorised and as a per-sample loop (same draws: the losses agree);
* ``distributed``: IG wall time in 1 and 2 processes (gloo, one thread each) vs one process.

All of it runs on the CPU whatever ``--device`` says: the result's ``device`` is ``cpu``,
``device_requested`` the device asked for.
"""
from __future__ import annotations

import datetime
import json
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import taylor_kernels as tk
from taylor_kernels import priors
from taylor_kernels.benchmarks.report import fmt_time, format_table
from taylor_kernels.benchmarks.timing import measure

SENTENCES = ["A man is playing a guitar.", "Someone plays music on an instrument!",
             "The cat sleeps on the warm windowsill.", "Stock prices fell sharply on Monday.",
             "A child is riding a red bicycle down the hill.", "She reads a book in the park.",
             "Heavy rain caused flooding in the city.", "The chef prepares a delicious meal."]
TIERS = {
    "smoke": {"minilm": (2, 4, 1), "dapr": (22, 8, 40, 2), "dist": (4, 8, 8, 1)},
    "quick": {"minilm": (8, 20, 3), "dapr": (1002, 32, 200, 10), "dist": (64, 256, 100, 3)},
    "full": {"minilm": (8, 50, 5), "dapr": (1002, 32, 200, 30), "dist": (128, 512, 200, 5)},
}  # minilm: (sentences, steps, repeats); dapr: (features, batch, background, repeats);
#    dist: (batch, dim, steps, repeats)


def plain_dapr_loss(model, prior_net, meta, x, y, background, lam, seed, loop=False):
    """:func:`priors.dapr_loss` written with plain autograd: the same draws as
    ``tk.expected_gradients(samples=1, seed=seed)`` (reference index, then ``t`` in float64),
    ``phi = (x - r) * d f_y / dx (r + t (x - r))``; ``loop`` computes it sample by sample."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, background.shape[0], (x.shape[0], 1), generator=gen)[:, 0]
    t = torch.rand(x.shape[0], 1, 1, generator=gen, dtype=torch.float64)[:, :, 0].to(x.dtype)
    ref = background[idx]
    rows = [slice(i, i + 1) for i in range(x.shape[0])] if loop else [slice(None)]
    phi = []
    for r in rows:
        pts = (ref[r] + t[r] * (x[r] - ref[r])).requires_grad_(True)
        out = model(pts).gather(1, y[r, None]).sum()
        (g,) = torch.autograd.grad(out, pts, create_graph=True)
        phi.append((x[r] - ref[r]) * g)
    ce = nn.functional.cross_entropy(model(x), y)
    return ce + lam * priors.attribution_prior_penalty(torch.cat(phi), prior_net(meta))


def _dapr_rows(features, batch, n_bg, repeats, log) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2))
    prior = priors.PriorNet(2)
    bg = torch.randn(n_bg, features)
    meta = priors.feature_metadata(bg)
    x, y = bg[:batch], torch.randint(0, 2, (batch,))
    opt = torch.optim.Adam(list(model.parameters()) + list(prior.parameters()), lr=1e-4)
    losses = {}

    def step(name, loss_fn):
        def run():
            loss = loss_fn()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name] = loss.item()
        return run

    fns = {"tk.expected_gradients": lambda: priors.dapr_loss(
               model, prior, meta, x, y, bg, 1.0, seed=3)[0],
           "plain autograd (vectorised)": lambda: plain_dapr_loss(
               model, prior, meta, x, y, bg, 1.0, seed=3),
           "plain autograd (per-sample loop)": lambda: plain_dapr_loss(
               model, prior, meta, x, y, bg, 1.0, seed=3, loop=True)}
    check = [float(f().detach()) for f in fns.values()]  # same draws: the same loss
    rows = []
    for (name, fn), value in zip(fns.items(), check):
        t = measure(step(name, fn), warmup=1, repeats=repeats)
        rows.append({"case": "dapr_step", "method": name, "features": features, "batch": batch,
                     "median_s": t.median, "iqr_s": t.iqr, "loss_at_start": value,
                     "loss_diff_vs_ours": abs(value - check[0])})
        log(f"[scale] dapr_step {name}: {fmt_time(t.median)}")
    return rows


def _rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``|out - ref| / |ref|`` (Frobenius norms): one call's agreement with Captum's."""
    return ((out - ref).norm() / ref.norm()).item()


def _minilm_rows(n, steps, repeats, log) -> list[dict]:
    try:
        from taylor_kernels.demo import minilm
        model, tok = minilm.load()
    except ModuleNotFoundError as exc:
        log(f"[scale] minilm skipped: {exc}")
        return [{"case": "minilm", "method": "skipped", "skipped": True,
                 "error": str(exc)[:200]}]
    from captum.attr import LayerIntegratedGradients

    tokens, ids, mask, base = minilm.encode_batch(tok, (SENTENCES * 2)[:n])
    with torch.no_grad():
        other = model(*minilm.encode_batch(tok, ["A person performs a song."])[1:3])[0]
    score = minilm.similarity_to(model, other)
    def ours(max_memory=None):
        return tk.layer_integrated_gradients(score, model.word_embeddings, ids, base,
                                             steps=steps, additional_forward_args=(mask,),
                                             max_memory=max_memory).attributions
    lig = LayerIntegratedGradients(score, model.word_embeddings)
    theirs = lambda: lig.attribute(ids, base, additional_forward_args=(mask,),  # noqa: E731
                                   n_steps=steps, method="gausslegendre")
    ref = theirs()
    calls = {"tk.layer_integrated_gradients": ours,
             "tk ... max_memory='4GB' (one chunk)": lambda: ours("4GB"),
             "captum LayerIntegratedGradients": theirs}
    rows = []
    for name, fn in calls.items():  # each of our calls against Captum's (4GB: one chunk)
        diff = None if fn is theirs else _rel_diff(fn(), ref)
        t = measure(fn, warmup=0, repeats=repeats)
        rows.append({"case": "minilm", "method": name, "sentences": n, "tokens": ids.shape[1],
                     "steps": steps, "median_s": t.median, "iqr_s": t.iqr,
                     "inputs_per_s": n / t.median, "rel_diff": diff})
        log(f"[scale] minilm {name}: {n / t.median:.2f} sentences/s")
    return rows


def _dist_worker(rank, world, port, spec, out):
    """One rank (``world = 0``: no process group) timing IG on a seeded MLP; writes JSON."""
    torch.set_num_threads(1)
    if world:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=120))
    batch, dim, steps, repeats = spec
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(dim, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                          nn.Linear(256, 10))
    x = torch.randn(batch, dim)
    fn = lambda: tk.integrated_gradients(model, x, target=0, steps=steps,  # noqa: E731
                                         distributed=bool(world))
    if world:
        dist.barrier()
    fn()  # warmup
    cpu0 = time.process_time()
    t = measure(fn, warmup=0, repeats=repeats)
    cpu = (time.process_time() - cpu0) / repeats  # this rank's CPU seconds per call
    Path(f"{out}.{rank}").write_text(json.dumps({**t.as_dict(), "cpu_s": cpu}))
    if world:
        dist.destroy_process_group()


def _dist_rows(spec, worlds, log) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = f"{tmp}/w{world}"
            if world:
                mp.spawn(_dist_worker, args=(world, port, spec, out), nprocs=world)
            else:  # in this process (one thread, set by run)
                _dist_worker(0, 0, 0, spec, out)
            times = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(max(world, 1))]
            median = max(t["median_s"] for t in times)  # the slowest rank ends the call
            cpu = max(t["cpu_s"] for t in times)
            rows.append({"case": "distributed", "method": f"{world} process(es)" if world
                         else "1 process, no process group", "processes": max(world, 1),
                         "batch": spec[0], "dim": spec[1], "steps": spec[2],
                         "median_s": median, "points_per_s": spec[0] * spec[2] / median,
                         "rank_cpu_s": cpu})
            log(f"[scale] distributed world={world}: {fmt_time(median)}")
    base = rows[0]["median_s"]
    for r in rows:
        r["speedup"] = base / r["median_s"]
    return rows


def run(tier: str, device: torch.device, log=print) -> dict:
    """The whole family on the CPU, whatever ``device`` (recorded: ``device`` is where it ran,
    ``device_requested`` what was asked)."""
    cfg = TIERS[tier]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each distributed rank; shared CPUs make 2 threads spin
    try:
        rows = _minilm_rows(*cfg["minilm"], log) + _dapr_rows(*cfg["dapr"], log) + \
            _dist_rows(cfg["dist"], (0, 2) if tier == "smoke" else (0, 1, 2), log)
    finally:
        torch.set_num_threads(threads)
    notes = ["minilm: sentences/s of token attributions (similarity to a fixed sentence), "
             "one padded batch, CPU float32, 1 thread (whole family); rel diff = "
             "|this row's attributions - captum| / |captum|",
             "dapr_step: loss + backward + Adam step, 1 EG sample per input, MLP 64-64",
             "distributed: gloo on one machine, 1 thread per process; the slowest rank's "
             "median; speedup vs one process without a process group; CPU/rank = the busiest "
             "rank's CPU time per call (the work each rank does, whatever the machine's load)",
             f"the whole family runs on the CPU, whatever --device says (asked: {device})"]
    return {"rows": rows, "notes": notes, "device": "cpu", "device_requested": str(device)}


def tables(result: dict) -> list[str]:
    rows = result["rows"]
    by = {c: [r for r in rows if r["case"] == c] for c in ("minilm", "dapr_step",
                                                             "distributed")}
    mini = [("method", "method", ""), ("sentences", "B", "d"), ("tokens", "L", "d"),
            ("steps", "steps", "d"), ("median_s", "time", fmt_time),
            ("inputs_per_s", "sentences/s", ".2f"), ("rel_diff", "rel diff", ".1e")]
    if any("error" in r for r in by["minilm"]):
        mini.append(("error", "error", ""))
    dapr = [("method", "method", ""), ("features", "D", "d"), ("batch", "B", "d"),
            ("median_s", "step time", fmt_time), ("iqr_s", "IQR", fmt_time),
            ("loss_diff_vs_ours", "|loss - ours|", ".1e")]
    dist_cols = [("method", "method", ""), ("batch", "B", "d"), ("steps", "steps", "d"),
                 ("median_s", "time", fmt_time), ("points_per_s", "points/s", ".0f"),
                 ("speedup", "speedup", ".2f"), ("rank_cpu_s", "CPU/rank", fmt_time)]
    notes = result["notes"]
    return [format_table("scale: MiniLM token attribution", by["minilm"], mini,
                         notes[:1] + notes[3:]),
            format_table("scale: one DAPr training step", by["dapr_step"], dapr, notes[1:2]),
            format_table("scale: distributed IG (CPU)", by["distributed"], dist_cols,
                         notes[2:3])]
