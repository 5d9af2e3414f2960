import torch

# Test tensors are tiny: one thread avoids OpenMP spin-waiting, which is 10-20x slower on a busy 2-core box.
torch.set_num_threads(1)
