"""Put the samples of several inference runs side by side, one labelled row per run.

    python scripts/compose_rows.py OUT.png DIR:LABEL [DIR:LABEL ...]

Each DIR is a --save_dir of `ddpm_main.py --inference` (it reads DIR/samples.npz).
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ddpm_outputs import save_labelled_rows  # noqa: E402


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    rows = []
    for spec in argv[1:]:
        directory, _, label = spec.partition(":")
        npz = Path(directory) / "samples.npz"
        if not npz.is_file():
            print(
                f"error: {npz} not found (run ddpm_main.py --inference --save_dir {directory} first)", file=sys.stderr
            )
            return 2
        rows.append((label or directory, torch.from_numpy(np.load(npz)["arr_0"])))
    save_labelled_rows(rows, argv[0])
    print(f"wrote {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
