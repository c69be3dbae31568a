import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(ROOT))

# the command-line tools pick the machine's BLAS (titans_mlx/blas.py); the tests and their subprocesses keep MLX's
# own, so that what they print does not depend on whether an OpenBLAS is installed (tests/test_blas.py unsets this)
import os  # noqa: E402

os.environ["TITANS_MLX_BLAS"] = "stock"
