"""The default memory limit on the CPU sees a container's cgroup limit and ``ulimit -v``:
it read ``/proc/meminfo`` only, which shows the host's free memory (a QA pass on `max_memory`
named it)."""
from __future__ import annotations

import subprocess
import sys

import torch

from taylor_kernels.engine import memory

MiB = 2**20


def _tree(root, cgroup_line: str, files: dict[str, str]) -> None:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroup_line + "\n")
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def test_cgroup_v2_limit_of_the_process_or_an_ancestor(tmp_path):
    _tree(tmp_path, "0::/box/job", {
        "sys/fs/cgroup/box/memory.max": str(600 * MiB),
        "sys/fs/cgroup/box/memory.current": str(500 * MiB),      # 100 MiB left above
        "sys/fs/cgroup/box/job/memory.max": "max",
        "sys/fs/cgroup/box/job/memory.current": str(400 * MiB),
        "sys/fs/cgroup/memory.max": "max"})
    assert memory.cgroup_room(str(tmp_path)) == 100 * MiB


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    _tree(tmp_path / "a", "4:memory:/job", {
        "sys/fs/cgroup/memory/job/memory.limit_in_bytes": str(1024 * MiB),
        "sys/fs/cgroup/memory/job/memory.usage_in_bytes": str(1000 * MiB),
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712"})
    assert memory.cgroup_room(str(tmp_path / "a")) == 24 * MiB
    _tree(tmp_path / "b", "4:memory:/elsewhere", {  # a namespaced path: the mount's own files
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(1000 * MiB)})
    assert memory.cgroup_room(str(tmp_path / "b")) >= 2**62


def test_default_budget_takes_the_least_room(monkeypatch):
    monkeypatch.setattr(memory, "cgroup_room", lambda: 64 * MiB)
    monkeypatch.setattr(memory, "_CPU_FREE", [float("-inf"), 0])
    budget = memory.parse_budget(None, torch.device("cpu"))
    assert isinstance(budget, memory.DefaultBudget)
    assert budget == int(64 * MiB * memory.DEFAULT_FREE_FRACTION)


def test_rlimit_as_is_read_in_a_limited_process():
    code = ("import resource; from taylor_kernels.engine import memory as m\n"
            "size = next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') "
            "if l.startswith('VmSize:'))\n"
            "resource.setrlimit(resource.RLIMIT_AS, (size + 256 * 2**20, resource.RLIM_INFINITY))\n"
            "print(m.rlimit_room())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 200 * MiB < int(out.stdout.strip()) <= 256 * MiB


def test_samples_held_beside_a_budget_are_taken_from_it():
    """Sampling wrappers hold their drawn inputs and baselines through the call, outside the
    engine's accounting (LayerGradientShap 1.9x of a 4 MB budget): ``memory.beside`` takes
    them off the budget (each storage once) and refuses a budget they fill."""
    cpu = torch.device("cpu")
    a = torch.zeros(64 * 1024)                       # 256 KiB
    assert memory.beside(None, a, cpu) is None
    assert memory.beside("1MB", (a, [a[:10], None]), cpu) == MiB - 256 * 1024
    try:
        memory.beside(200 * 1024, a, cpu)
    except MemoryError as exc:
        assert "drawn samples" in str(exc)
    else:
        raise AssertionError("a budget the samples fill must raise")


def test_gradient_shap_front_counts_its_draws():
    import numpy as np
    from taylor_kernels.captum import GradientShap, NoiseTunnel, IntegratedGradients
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, bl = torch.randn(4, 256), torch.randn(3, 256)
    np.random.seed(0)
    try:  # 4 x 64 draws of 1 KiB inputs and baselines: 512 KiB against 300 KiB
        GradientShap(model).attribute(x, bl, n_samples=64, target=1, max_memory=300 * 1024)
    except MemoryError as exc:
        assert "drawn samples" in str(exc)
    else:
        raise AssertionError("draws larger than max_memory must raise")
    try:
        NoiseTunnel(IntegratedGradients(model)).attribute(x, nt_samples=128, target=1,
                                                          max_memory=300 * 1024)
    except MemoryError as exc:
        assert "drawn samples" in str(exc)
    else:
        raise AssertionError("noisy copies larger than max_memory must raise")


def test_a_budget_too_small_for_one_point_stops_the_probe_forward():
    """A budget too small for one path point was found by running the whole probe forward
    (a CNN on 128x128 images at 12-26x of a 1 MB budget before its ``MemoryError``): the
    probes now stop once the forward saved more than a point within the budget could."""
    import pytest

    import taylor_kernels as tk
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(64, 2**16), torch.nn.Tanh(),  # 256 KiB a row
                               torch.nn.Linear(2**16, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 2))
    reached = []
    wide[4].register_forward_hook(  # forwards that record a graph (check R's run without)
        lambda m, i, o: reached.append(i[0].shape[0]) if torch.is_grad_enabled() else None)
    x = torch.randn(2, 64)
    with pytest.raises(MemoryError, match="stopped"):
        tk.integrated_gradients(wide, x, target=0, steps=8, max_memory=200 * 1024)
    assert reached == []  # no probe reached the last layer: the first tanh's save stopped it
    with pytest.raises(MemoryError, match="stopped"):
        tk.hessian(lambda z: wide(z)[:, 0], x, max_memory=200 * 1024)
    assert reached == []


def test_the_peak_restore_skips_what_neither_the_device_nor_the_cache_holds(monkeypatch):
    """Raising the caller's CUDA peak back needs ``peak - allocated`` bytes; when they are not
    free the restore found out by an out-of-memory error, after the allocator had freed every
    cached block and counted an OOM (a user who freed a large model paid it on every probe).
    Simulated allocator: 1 GB live, old peak 60 GB, 2 GB free on the device, 1 GB cached."""
    from taylor_kernels.engine import guards
    GB = 2**30
    asked = []
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: GB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: GB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 2 * GB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (2 * GB, 80 * GB))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d=None: asked.append("stats") or {})
    guards._raise_cuda_peak(60 * GB, torch.device("cuda"))
    assert asked == []  # not even a first allocation


def test_jet_passes_take_half_the_budget_and_trim_the_heap_past_three_quarters(monkeypatch):
    """Under ``max_memory`` a CPU jet pass gets ``CPU_CHUNK_SHARE`` of the budget, and the
    heap is trimmed after a pass once the process has grown past ``RESIDENT_TRIM_AT`` of it
    (glibc's heap kept about 1 MB per pass: 512 directions under 32 MB peaked at 47 MB)."""
    import taylor_kernels as tk
    from taylor_kernels.engine import jet as jet_engine
    from taylor_kernels.engine.row_args import with_forward_args
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 1), torch.nn.Flatten(0))
    x, v = torch.randn(2, 16), torch.randn(2, 24, 16)
    fa = with_forward_args(model, None, 2)
    whole = jet_engine.directions_per_pass(fa, x, 3, 10**12)  # per pass, huge budget
    per_direction = 10**12 * memory.CPU_CHUNK_SHARE / whole
    budget = int(4.5 * per_direction / memory.CPU_CHUNK_SHARE)  # 4 directions per pass
    assert jet_engine.directions_per_pass(fa, x, 3, budget) == max(
        1, int(budget * memory.CPU_CHUNK_SHARE // per_direction))
    if not memory.ResidentTrim(budget, x.device).active:
        return  # (no glibc or /proc here)
    grown, trims = iter(range(0, 10**12, budget // 4)), []
    monkeypatch.setattr(memory, "_resident_bytes", lambda: next(grown))  # a quarter per read
    monkeypatch.setattr(memory, "_MALLOC_TRIM", lambda pad: trims.append(pad))
    with torch.no_grad():
        got = tk.jet(model, x, v, order=3, max_memory=budget)
    passes = -(-24 // jet_engine.directions_per_pass(fa, x, 3, budget))
    assert passes == 6 and len(trims) == passes - 3  # (past 3/4 of it: from the 4th pass)
    torch.testing.assert_close(got, tk.jet(model, x, v, order=3))
