"""What a benchmark ran on, for its tables: the CPU model and its widest vector ISA."""
import os
import platform


def cpu_description() -> str:
    """e.g. 'AMD EPYC 7B13 (AVX2, 2 threads)': ratios to PyTorch differ between AVX2, AVX-512 and AMX machines."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    isa = [label for flag, label in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'}, {os.cpu_count()} threads)"


def gemm_peaks(size: int = 2048, repeats: int = 5) -> str:
    """e.g. 'GEMM peak (2048^3 fp32): MindSpore 179, PyTorch 136 GFLOP/s': a ratio between the two
    frameworks follows their GEMMs on the machine at hand."""
    ours, theirs = gemm_peak_rates(size, repeats)
    return f"GEMM peak ({size}^3 fp32): MindSpore {ours:.0f}, PyTorch {theirs:.0f} GFLOP/s"


def gemm_peak_rates(size: int = 2048, repeats: int = 5) -> tuple:
    """(MindSpore, PyTorch): the best fp32 GFLOP/s of a size^3 matmul, MindSpore's compiled."""
    import time

    import numpy as np
    import mindspore as ms
    import torch
    from mindspore import Tensor, ops

    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    flops = 2 * size ** 3 / 1e9

    def best(run):
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return flops / min(times)

    ms_matmul = ms.jit(ops.matmul)
    x = Tensor(a)
    ours = best(lambda: ms_matmul(x, x).asnumpy())
    t = torch.from_numpy(a)
    theirs = best(lambda: torch.matmul(t, t))
    return ours, theirs
