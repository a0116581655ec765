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
