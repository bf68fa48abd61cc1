import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))  # bench/models.py

# Both cores, as a user's training run would have them.
torch.set_num_threads(max(1, torch.get_num_threads()))
