import os

# Tests run on CPU with the torch reference kernels unless a test opts into Triton's interpreter.
os.environ.setdefault("ETRM_KERNELS", "torch")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

# Without a GPU, Triton kernels can only run in Triton's CPU interpreter, and the choice must be made
# before anything imports Triton (torch.compile's Dynamo does). Tests still use the torch path unless
# they set ETRM_KERNELS=triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(2)
