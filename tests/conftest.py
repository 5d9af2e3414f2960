import os

import torch

# Triton kernels run under its CPU interpreter when there is no GPU; the variable must be set
# before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test tensors are tiny: one thread avoids OpenMP spin-waiting, which is 10-20x slower on a busy 2-core box.
torch.set_num_threads(1)
