import torch

# As in refcond's own tests/conftest.py: the tiny models are dominated by per-operator overhead, and on
# a small busy machine a second torch thread mostly waits, so the tests run single-threaded.
torch.set_num_threads(1)
