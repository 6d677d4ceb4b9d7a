"""A/B timing of the C++ CPU ops: two builds of taylor_kernels._C loaded in one process.

The old build has its op namespace renamed (sed TORCH_LIBRARY*(taylor_kernels, -> (tk_old,),
so both register side by side. Every case runs old and new alternately (order flipped every
pair), median of the per-pair ratios new/old; outputs compared (max abs diff, bitwise flag).
Usage: python bench/cpp_ops_ab.py OLD.so NEW.so [reps] [filter] [threads]
(no taylor_kernels import). One thread is timed by the thread's CPU time, more threads by wall
time. Columns: medians of old and new, median of the per-pair ratios, and the ratio of the minima
(the least disturbed run of each: on a loaded machine the steadier figure).
"""
import statistics
import sys
import time

import torch

OLD, NEW = sys.argv[1], sys.argv[2]
REPS = int(sys.argv[3]) if len(sys.argv) > 3 else 15
FILTER = sys.argv[4] if len(sys.argv) > 4 else ""
THREADS = int(sys.argv[5]) if len(sys.argv) > 5 else 2
torch.ops.load_library(OLD)
torch.ops.load_library(NEW)
old, new = torch.ops.tk_old, torch.ops.taylor_kernels
FNS = ["tanh", "sigmoid", "exp", "log", "softplus", "gelu", "gelu_tanh", "silu", "sin", "cos",
       "relu", "square", "reciprocal", "sqrt", "rsqrt"]
g = torch.Generator().manual_seed(0)


def rn(*s, dtype=torch.float32):
    return torch.randn(*s, generator=g).to(dtype)


def path_case(B, K, S, D, shared=False, dtype=torch.float32, per_point=False):
    x, bl = rn(B, D, dtype=dtype), rn(1 if shared else B, K, D, dtype=dtype)
    nodes = torch.rand((B, K, S) if per_point else (S,), generator=g, dtype=torch.float64)
    grads = rn(B * K * S, D, dtype=dtype)
    return x, bl, nodes, grads


def cases():
    for tag, args in [("B8 K4 S50 D32768 f32", (8, 4, 50, 32768)),
                      ("B16 K1 S50 D65536 shared f32", (16, 1, 50, 65536, True)),
                      ("B8 K4 S50 D32768 bf16", (8, 4, 50, 32768, False, torch.bfloat16)),
                      ("B4 K2 S16 D3072 perpoint f32",
                       (4, 2, 16, 3072, False, torch.float32, True)),
                      ("B2 K1 S8 D784 f64", (2, 1, 8, 784, False, torch.float64))]:
        x, bl, nodes, grads = path_case(*args)
        n = grads.shape[0]
        yield (f"path_points {tag}",
               lambda ns, x=x, bl=bl, a=nodes, n=n: ns.path_points(x, bl, a, 0, n))
        yield (f"path_accumulate {tag}",
               lambda ns, gr=grads, x=x, bl=bl, w=nodes: ns.path_accumulate(gr, x, bl, w, 0))
    for tag, (B, K, S, R, D) in [("count64 R32 D4096", (2, 1, 32, 32, 4096)),
                                 ("count256 R8 D784", (4, 2, 32, 8, 784))]:
        x, bl, w, _ = path_case(B, K, S, D)
        h = rn(B * K * S, R, D)
        idx = torch.randint(0, D, (R,), generator=g)
        yield (f"ih_accumulate {tag} f32",
               lambda ns, h=h, x=x, bl=bl, w=w, i=idx: ns.ih_accumulate(h, x, bl, w, i, 0))
    N = 1 << 20
    for K in (2, 4, 6):
        u = rn(K + 1, N) * 0.5
        u[0] = u[0].abs() + 0.5  # log / sqrt / rsqrt / reciprocal: positive u_0
        for code, fn in enumerate(FNS):
            yield f"jet_unary {fn} K={K} N=2^20 f32", lambda ns, u=u, c=code: ns.jet_unary(u, c)
        a, b = rn(K + 1, N), rn(K + 1, N)
        yield f"jet_mul K={K} N=2^20 f32", lambda ns, a=a, b=b: ns.jet_mul(a, b)
    ub = (rn(5, N) * 0.5).to(torch.bfloat16)
    yield "jet_unary tanh K=4 N=2^20 bf16", lambda ns: ns.jet_unary(ub, 0)
    ut = (rn(N, 5) * 0.5).t()
    yield "jet_unary gelu K=4 N=2^20 f32 strided", lambda ns: ns.jet_unary(ut, 5)
    us = rn(5, 4096) * 0.5
    yield "jet_unary tanh K=4 N=4096 f32", lambda ns: ns.jet_unary(us, 0)
    ab, bb = rn(5, N).to(torch.bfloat16), rn(5, N).to(torch.bfloat16)
    yield "jet_mul K=4 N=2^20 bf16", lambda ns: ns.jet_mul(ab, bb)
    for K in (2, 4, 6):
        c, gam = rn(K + 1, 16, 1 << 16), torch.randn(16, generator=g, dtype=torch.float64)
        yield (f"polarize_contract K={K} M=16 N=2^16 f32",
               lambda ns, c=c, gm=gam, K=K: ns.polarize_contract(c, gm, K))
    cb = rn(5, 16, 1 << 16).to(torch.bfloat16)
    yield "polarize_contract K=4 M=16 N=2^16 bf16", lambda ns: ns.polarize_contract(cb, gam, 4)
    ct = rn(1 << 16, 16, 5).permute(2, 1, 0)
    yield ("polarize_contract K=4 M=16 N=2^16 f32 strided",
           lambda ns: ns.polarize_contract(ct, gam, 4))


# One thread: the thread's CPU time (time descheduled by other users' load does not count);
# more threads: wall time.
CLOCK = time.thread_time if THREADS == 1 else time.perf_counter


def timed(fn):
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def main():
    torch.set_num_threads(THREADS)
    print(f"threads {torch.get_num_threads()}, reps {REPS}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, clock {CLOCK.__name__}")
    print(f"{'case':48s} {'old':>9s} {'new':>9s} {'new/old':>8s} {'min old':>9s} {'min new':>9s} "
          f"{'min n/o':>8s}  out")
    for name, f in cases():
        if FILTER not in name:
            continue
        fo, fn = (lambda: f(old)), (lambda: f(new))
        ro, rn_ = fo(), fn()
        same = torch.equal(ro.nan_to_num(), rn_.nan_to_num()) and torch.equal(ro.isnan(),
                                                                            rn_.isnan())
        diff = (ro.double() - rn_.double()).abs().nan_to_num().max().item()
        to, tn, ratio = [], [], []
        for i in range(REPS):
            if i % 2:
                a, b = timed(fn), timed(fo)
            else:
                b, a = timed(fo), timed(fn)
            to.append(b)
            tn.append(a)
            ratio.append(a / b)
        mo, mn = statistics.median(to), statistics.median(tn)
        print(f"{name:48s} {mo * 1e3:8.3f}m {mn * 1e3:8.3f}m {statistics.median(ratio):8.3f} "
              f"{min(to) * 1e3:8.3f}m {min(tn) * 1e3:8.3f}m {min(tn) / min(to):8.3f}  "
              f"{'bitwise' if same else f'maxdiff {diff:.1e}'}", flush=True)


main()
