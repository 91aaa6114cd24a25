"""Run train_dti_sdxl.main in one process of a torchrun job, then dump what this process holds.

    torchrun --nproc_per_node 2 tests/dist_worker.py DUMP_DIR <train_dti_sdxl.py arguments>

Each rank writes DUMP_DIR/rank<r>.pt with its learned directions after every step and at the end.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_dti_sdxl  # noqa: E402


def main():
    dump_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    history = []
    original_step = train_dti_sdxl.DirectionalTokens.step

    def recording_step(self, lr):
        original_step(self, lr)
        history.append(self.direction.detach().cpu().clone())

    train_dti_sdxl.DirectionalTokens.step = recording_step
    result = train_dti_sdxl.main(train_dti_sdxl.parse_args(argv))
    final = {name: tokens.embeddings().detach().cpu() for name, tokens in result.learned.items()}
    torch.save({"final": final, "history": history}, dump_dir / f"rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    main()
