"""Sustained float32 matrix-multiply GFLOP/s on this machine, for a few sizes.

    python benchmarks/peak.py
"""

from common import header, matmul_gflops, table

if __name__ == "__main__":
    print(header("Peak: float32 matrix multiply"))
    rows = [[f"{n} x {n}", f"{matmul_gflops(n):.1f}"] for n in (512, 1024, 2048, 4096)]
    print(table(["size", "GFLOP/s (median of 10)"], rows))
