"""Run a training script's main in one process of a torchrun job, then dump what this process holds.

    torchrun --nproc_per_node 2 tests/dist_worker.py train_dti_sdxl DUMP_DIR <train_dti_sdxl.py arguments>

Each rank writes DUMP_DIR/rank<r>.pt with its learned directions after every step and at the end.
"""

import importlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    script, dump_dir, argv = importlib.import_module(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    history = []
    original_step = script.DirectionalTokens.step

    def recording_step(self, lr, only_if=None):
        original_step(self, lr, only_if)
        history.append(self.direction.detach().cpu().clone())

    script.DirectionalTokens.step = recording_step
    result = script.main(script.parse_args(argv))
    final = {name: tokens.embeddings().detach().cpu() for name, tokens in result.learned.items()}
    concepts = [{name: t.embeddings().detach().cpu() for name, t in c.learned.items()} for c in result.concepts]
    lora = result.lora.state_dict() if getattr(result, "lora", None) else None
    dump = {"final": final, "concepts": concepts, "history": history, "lora": lora}
    torch.save(dump, dump_dir / f"rank{os.environ.get('RANK', '0')}.pt")


if __name__ == "__main__":
    main()
