"""The wheel: ``pip wheel --no-build-isolation .`` builds one that installs into a fresh virtual
environment holding only torch, imports, runs IG on the C++ kernels, and, under a torch other
than the one it was built against, says how to fix it and still runs the reference backend.

The build reuses CMake's build folder (``build/<wheel tag>``, shared with the editable install),
so after ``.ci/setup`` it configures and packs but compiles nothing (about 20 s); installing
torch into the fresh venv dominates. Marked ``slow``; CI runs it.
"""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from taylor_kernels import _native

ROOT = Path(__file__).resolve().parents[1]

# Run inside the fresh venv: import, report what loaded, run a tiny IG on both CPU backends.
PROBE = r"""
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import taylor_kernels as tk
    from taylor_kernels import _native
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
x = torch.randn(2, 5)
ref = tk.integrated_gradients(model, x, target=1, steps=16, backend="reference")
res = {"cpp": _native.has_cpp(), "file": tk.__file__, "torch": torch.__version__,
       "warnings": [str(w.message) for w in caught], "ref_gap": ref.gap.abs().max().item(),
       "matplotlib_imported": "matplotlib" in sys.modules}
if _native.has_cpp():
    out = tk.integrated_gradients(model, x, target=1, steps=16, backend="cpp")
    res["cpp_vs_ref"] = (out.attributions - ref.attributions).abs().max().item()
print(json.dumps(res))
"""


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _probe(python: Path, cwd: Path) -> dict:
    out = _run([python, "-c", PROBE], cwd=cwd, env={"PYTHONDONTWRITEBYTECODE": "1",
                                                     "PATH": "/usr/bin:/bin"}, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_torch_mismatch_names_both_versions():
    assert _native.torch_mismatch("2.13.0+cpu", "2.13.0+cpu") is None
    assert _native.torch_mismatch(None, "2.13.0") is None  # nothing recorded: nothing to check
    msg = _native.torch_mismatch("2.12.0", "2.13.0+cpu")
    assert "2.12.0" in msg and "2.13.0+cpu" in msg
    hint = _native.BUILD_HINT
    assert "--force-reinstall" in hint and "--no-build-isolation" in hint and "--no-deps" in hint


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("scikit_build_core", reason="the wheel build needs scikit-build-core")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
          "-w", out, ROOT], cwd=ROOT, timeout=1800)
    (whl,) = out.glob("taylor_kernels-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_contents_and_tags(wheel):
    assert wheel.name.endswith("-cp310-abi3-linux_x86_64.whl"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = zf.read("taylor_kernels/_build_info.py").decode()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "taylor_kernels/_C.abi3.so" in names and "taylor_kernels/__init__.py" in names
    assert not any(n.startswith("tests/") for n in names)
    assert f'TORCH_VERSION = "{torch.__version__}"' in info
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(r.split("<")[0].split(">")[0].split("=")[0] for r in requires) == \
        ["mpmath", "numpy", "torch", "tqdm"], requires


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv_with_only_torch(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=300)
    # this environment's pip installs into the new one; no byte-compiling (most of the time)
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
           "--no-compile", "--disable-pip-version-check"]
    # exactly the running torch distribution (a local +cpu build stays CPU: pip never picks a
    # CUDA wheel); its distribution version, which pip resolves: a PyPI CUDA wheel is "2.11.0"
    # while torch.__version__ reads "2.11.0+cu130"
    _run(pip + [f"torch=={importlib.metadata.version('torch')}"], timeout=1200)
    _run(pip + [wheel], timeout=600)
    site = next((venv / "lib").glob("python3*/site-packages"))
    res = _probe(venv / "bin" / "python", tmp_path)  # cwd outside the checkout
    assert res["file"].startswith(str(site)), res
    assert res["cpp"] and res["warnings"] == [], res
    assert res["cpp_vs_ref"] < 1e-5 and res["ref_gap"] < 1e-3, res
    assert not res["matplotlib_imported"], res

    # The same wheel as if built against another torch: one message with the fix, and the
    # reference backend still runs.
    info = site / "taylor_kernels" / "_build_info.py"
    info.write_text(info.read_text().replace(torch.__version__, "2.11.0+cu126"))
    res = _probe(venv / "bin" / "python", tmp_path)
    assert not res["cpp"] and "cpp_vs_ref" not in res and res["ref_gap"] < 1e-3, res
    (msg,) = res["warnings"]
    assert f"built against torch 2.11.0+cu126 but torch {torch.__version__} is installed" in msg
    assert "pip install --no-build-isolation --no-deps --force-reinstall" in msg
