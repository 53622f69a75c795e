import torch

pytest_plugins = ["refcond.testing.fixtures"]

# The tiny test models are dominated by per-operator overhead: on 2 cores, a second torch thread
# mostly waits (and on a busy machine slows a forward by 5-10x), so tests run single-threaded.
torch.set_num_threads(1)
