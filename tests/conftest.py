import os

import torch

torch.set_num_threads(int(os.environ.get("NEGMERGE_THREADS", "1")))
