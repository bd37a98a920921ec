"""Run several scripts' main() one after another in each torchrun process (tests/conftest.py's
`ddp_runs`): each process imports torch and torchvision once (~6 s on a 2-core CPU) for all of
them. A run that raises leaves OUT/ERROR-rank<r> with the traceback and the next one goes on."""
import importlib
import json
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One process group for all the runs: each script's main() joins it if none is there (data.py's
# init_distributed) and never leaves it (data.run_main, not called here, does that for a real
# command line); re-creating it for every script lost connections between the two processes.

for script, argv in json.loads(sys.argv[1]):
    out = argv[argv.index("--out") + 1]
    try:
        importlib.import_module(script).main(argv)
    except BaseException:  # noqa: B036 (SystemExit too: record it, go on)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"ERROR-rank{os.environ.get('RANK', '0')}"), "w") as f:
            f.write(traceback.format_exc())
    if torch.distributed.is_initialized():  # the next run starts when rank 0 has written this
        torch.distributed.barrier()         # one's files (a --resume reads its checkpoint)
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
