import os

# Tests run on CPU with the torch reference kernels unless a test opts into Triton's interpreter.
os.environ.setdefault("ETRM_KERNELS", "torch")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

torch.set_num_threads(2)
