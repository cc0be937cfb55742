"""PyTorch half of `deno task bench:ffi` (bench/ffi_overhead.ts spawns this).

Runs the same small-tensor ops with the same timing scheme as the TypeScript
side and prints one JSON object on stdout: µs per op (median of reps, and
their spread), the torch version and the libtorch_cpu file this process
loaded. The config comes as JSON in argv[1] so both sides always agree on
sizes and time budgets.
"""
import json
import statistics
import sys
import time

try:
    import torch
except ImportError as e:  # the TS side turns this into an install hint
    print(json.dumps({"error": f"cannot import torch: {e}"}))
    sys.exit(2)

cfg = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {"size": 8, "reps": 7, "repMs": 20, "warmMs": 30}
torch.set_num_threads(1)  # the TS side also sets OMP_NUM_THREADS=1 in our env
torch.manual_seed(0)
n = cfg["size"]
a, b = torch.randn(n, n), torch.randn(n, n)
idx = torch.arange(0, n, 2)

# Same ops, same argument forms, as OPS in ffi_overhead.ts. Each lambda's result
# is dropped as soon as it returns, so refcounting frees it: the counterpart of
# our explicit dispose().
OPS = {
    "add": lambda: a.add(b),
    "mul(scalar)": lambda: a.mul(2.0),
    "matmul": lambda: a.matmul(b),
    "softmax(-1)": lambda: a.softmax(-1),
    "sum": lambda: a.sum(),
    "reshape": lambda: a.reshape(n // 2, n * 2),
    "transpose": lambda: a.transpose(0, 1),
    "narrow": lambda: a.narrow(0, 2, n // 2),
    "exp": lambda: a.exp(),
    "index_select": lambda: a.index_select(0, idx),
}
fs = list(OPS.values())


def mix():
    for f in fs:
        f()


def batch_ms(f, iters):
    t0 = time.perf_counter_ns()
    for _ in range(iters):
        f()
    return (time.perf_counter_ns() - t0) / 1e6


def measure(f, ops_per_call=1):
    """[median, spread] of µs per op, spread = (max - min) / median of the reps.

    Doubling batches until one takes warmMs both warm up and calibrate; then
    `reps` batches of ~repMs each. GC stays on (timeit turns it off), as V8's
    GC stays on for the TS side."""
    iters = 1
    while (t := batch_ms(f, iters)) < cfg["warmMs"]:
        iters *= 2
    iters = max(1, round(iters * cfg["repMs"] / t))
    reps = [batch_ms(f, iters) * 1e3 / iters / ops_per_call for _ in range(cfg["reps"])]
    med = statistics.median(reps)
    return [med, (max(reps) - min(reps)) / med]


def loaded_libtorch():
    with open("/proc/self/maps") as maps:
        return next((line.split()[-1] for line in maps if "libtorch_cpu" in line), "?")


result = {name: measure(f) for name, f in OPS.items()}
result["mix"] = measure(mix, len(fs))
print(json.dumps({
    "version": torch.__version__,
    "lib": loaded_libtorch(),
    "threads": torch.get_num_threads(),
    "python": sys.version.split()[0],
    "us": result,
}))
