"""A stand-in training script for launch tests: each rank records the arguments and the
torchrun environment it was started with, in $LAUNCH_SEEN/rank<RANK>.json."""

import json
import os
import sys
from pathlib import Path

rank = os.environ["RANK"]
record = {"rank": rank, "world_size": os.environ["WORLD_SIZE"], "argv": sys.argv[1:]}
Path(os.environ["LAUNCH_SEEN"], f"rank{rank}.json").write_text(json.dumps(record))
