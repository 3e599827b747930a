"""How many steps does each sampler need? Evaluate one model with several samplers and step counts.

    python scripts/sampler_table.py MODEL OUT_DIR "ddpm:1000 ddim:20 dpm++2m:20" [ddpm_main.py flags...]

Runs `ddpm_main.py --evaluate` once per SAMPLER:STEPS (same seed, so the same start noise), into
OUT_DIR/<sampler>_<steps>/, then writes OUT_DIR/sampler_table.md with, per setting: the FID against
the training set, the Frechet distance to the samples of the FIRST setting (make it the reference,
e.g. ddpm:1000, the full ancestral chain), class consistency and sampling time. The first setting is
also run with the next seed, which measures the noise floor of these distances at this sample count.
Extra flags go to every run, e.g. --fid_num_samples 256 --fid_features random-conv --guidance_scale 3.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ddpm_main  # noqa: E402
from ddpm_evaluate import FEATURE_EXTRACTORS, extract_features, feature_statistics, frechet_distance  # noqa: E402


def evaluate(model: str, out_dir: Path, sampler: str, steps: str, seed: int, extra: list[str]) -> Path:
    save_dir = out_dir / f"{sampler}_{steps}" if seed == 0 else out_dir / f"{sampler}_{steps}_seed{seed}"
    code = ddpm_main.main(
        [
            "--evaluate",
            "--model_path",
            model,
            "--sampler",
            sampler,
            "--sampling_steps",
            steps,
            "--save_dir",
            str(save_dir),
            *extra,
            "--seed",
            str(seed),
        ]
    )
    if code != 0:
        sys.exit(code)
    return save_dir


def sample_statistics(save_dir: Path, extractor, device: str) -> tuple[np.ndarray, np.ndarray]:
    images = torch.from_numpy(np.load(save_dir / "samples.npz")["arr_0"]).permute(0, 3, 1, 2)
    features, _ = extract_features(extractor, images, 256, device, desc=f"features of {save_dir.name}")
    return feature_statistics(features)


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    model, out_dir, settings, extra = argv[0], Path(argv[1]), [s.split(":") for s in argv[2].split()], argv[3:]
    runs = [(f"{sampler} {steps}", evaluate(model, out_dir, sampler, steps, 0, extra)) for sampler, steps in settings]
    sampler, steps = settings[0]
    runs.insert(1, (f"{sampler} {steps}, next seed (noise floor)", evaluate(model, out_dir, sampler, steps, 1, extra)))

    results = [json.loads((save_dir / "evaluation.json").read_text()) for _, save_dir in runs]
    device = ddpm_main.select_device(ddpm_main.build_parser().parse_args(extra))
    extractor = FEATURE_EXTRACTORS[results[0]["feature_extractor"]](device)
    statistics = [sample_statistics(save_dir, extractor, device) for _, save_dir in runs]
    lines = [
        f"| sampler, steps | FID vs training set | distance to {runs[0][0]} samples | class consistency | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for index, ((name, _), result, stats) in enumerate(zip(runs, results, statistics)):
        distance = "(reference)" if index == 0 else f"{frechet_distance(*stats, *statistics[0]):.3f}"
        consistency = "-" if result["class_consistency"] is None else f"{result['class_consistency']:.3f}"
        lines.append(
            f"| {name} | {result['fid']:.3f} | {distance} | {consistency} | {result['sampling_seconds']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    (out_dir / "sampler_table.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
