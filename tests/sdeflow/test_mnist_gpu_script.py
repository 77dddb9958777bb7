"""benchmarks/mnist_gpu.py, the prepared GPU check, runs end to end on a CPU with tiny settings."""

import importlib.util
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mnist_gpu.py"


def test_mnist_gpu_script_smoke(capsys):
    spec = importlib.util.spec_from_file_location("mnist_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--device", "cpu", "--iterations", "1", "--warmup", "0", "--bare-repeats", "1",
                          "--batch", "2", "--channels", "8", "--precision", "fp32", "--samples", "0",
                          "--data", "synthetic"])
    out = capsys.readouterr().out
    assert "iteration (1 timed)" in out and "bare f+s forward+backward" in out and "losses finite: True" in out
    assert result["iteration_s"] > 0 and result["bare_s"] > 0 and math.isfinite(result["ratio"])
    # one step runs N = 5 steps of both U-Nets and the adjoint's recomputation: clearly more than one bare node
    assert result["ratio"] > 2
