import os

# One BLAS thread: the decompositions' SVDs gain little from two on small matrices, and
# spinning BLAS threads contend with onnxruntime's. Set before numpy is imported.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import sys  # noqa: E402

from onnxcompress.cli import main  # noqa: E402

sys.exit(main())
