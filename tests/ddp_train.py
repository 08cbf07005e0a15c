"""Runs the shrunk default experiment under trainer=ddp; each rank saves its final MaskGIT weights.

    python tests/ddp_train.py OUT_DIR HYDRA_OVERRIDE...

Lightning's launcher re-runs this same command for rank 1, so both ranks
execute it; rank r writes OUT_DIR/rank{r}.pt.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import compose_config  # noqa: E402
from magnets.data import fashion_mnist  # noqa: E402
from magnets.pipeline import train  # noqa: E402

fashion_mnist.PAYLOAD_SHA256 = json.loads(os.environ["TEST_PAYLOAD_SHA256"])

out_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
result = train(compose_config(overrides))
rank = int(os.environ.get("LOCAL_RANK", "0"))
module = result["maskgit"]["module"]
batches = module.trainer.datamodule.train_dataloader().dataset  # this rank's SeededTokenBatches
torch.save({"state_dict": module.state_dict(), "first_batch": batches.batch_indices(0)}, out_dir / f"rank{rank}.pt")
