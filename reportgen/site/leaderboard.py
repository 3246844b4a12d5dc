"""The evaluation pooled over the manifest: per map, the mean and spread of each curve's area,
how often it beats the random baseline, and its pointing-game rate in the boxes.

Read from the image records (fresh and cached alike); numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reportgen.site.records import plain

#: The curves, as the records name them.
KINDS = ("deletion", "negative", "insertion")

#: For orientation: Chefer, Gur & Wolf, "Transformer Interpretability Beyond Attention
#: Visualization" (CVPR 2021), Table 2, ViT-B/16 on the ImageNet validation set: the area under
#: the positive and negative perturbation curves, in percent.
PUBLISHED = {
    "source": "Chefer, Gur & Wolf, CVPR 2021, Table 2: ViT-B/16, ImageNet validation set, area under the "
              "perturbation curves in percent",
    "rows": [
        {"method": "raw attention", "positive": 23.99, "negative": 45.55},
        {"method": "rollout", "positive": 20.05, "negative": 53.1},
        {"method": "relevance (Chefer et al.)", "positive": 17.03, "negative": 54.16},
    ],
}


def leaderboard(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The leaderboard of the images that were evaluated, or None when none was.

    Returns:
        ``{"images": n, "maps": [...], "random": {kind: {"mean", "std"}}, "published": ...}``
        (``random``: the random orders scored with each image's target);
        each map's entry holds ``name``, ``images`` (how many images have the map), ``auc`` (per kind ``{"mean", "std"}``, the
        standard deviation over the images), ``beats_random`` (per kind, in how many images) and
        ``pointing`` (``hits``, ``boxes``, ``rate``: None without boxes; boxes where the map is
        flat over the image do not count) and ``mass_ratio``
        (the mean over boxes of the map's mass in the box divided by the box's share of the image),
        ``sanity_flagged`` (in how many images the sanity check flagged it; None when not run) and
        ``sanity_images`` (in how many of the images with the map it ran).
    """
    evaluated = [r["evaluation"] for r in records if not r.get("error") and r.get("evaluation")]
    if not evaluated:
        return None
    # Every map of any image, in page order: the maps of further classes and objects only where
    # an image has them (an image without objects has no object maps).
    names = list(dict.fromkeys(name for e in evaluated for name in e["maps"]))
    checked = [e for e in evaluated if e.get("sanity")]
    maps = []
    for name in names:
        having = [e for e in evaluated if name in e["auc"]]
        # An area is None where the map's target could not be scored (see the perturbation).
        aucs = {kind: np.array([a for e in having if (a := e["auc"][name][kind]) is not None], dtype=np.float64)
                for kind in KINDS}
        boxes = [b for e in having for b in e["localisation"] if b["hit"][name] is not None]  # a flat map points nowhere
        hits = sum(bool(b["hit"][name]) for b in boxes)
        ratios = [b["mass"][name] / b["area_share"] for b in boxes if b["mass"][name] is not None and b["area_share"]]
        sane = [e for e in checked if name in e["sanity"]["flagged"]]
        maps.append({
            "name": name,
            "images": len(having),
            "auc": {kind: {"mean": plain(values.mean()) if values.size else None, "std": plain(values.std()) if values.size else None}
                    for kind, values in aucs.items()},
            "beats_random": {kind: sum(bool(e["beats_random"][name][kind]) for e in having) for kind in KINDS},
            "pointing": {"hits": hits, "boxes": len(boxes), "rate": plain(hits / len(boxes)) if boxes else None},
            "mass_ratio": plain(float(np.mean(ratios))) if ratios else None,
            # In how many of the images with the sanity check the map was flagged (None: not run).
            "sanity_flagged": sum(bool(e["sanity"]["flagged"][name]) for e in sane) if checked else None,
            "sanity_images": len(sane),
        })
    random = {}
    for kind in KINDS:
        values = np.array([e["random"][kind]["auc_mean"] for e in evaluated], dtype=np.float64)
        random[kind] = {"mean": plain(values.mean()), "std": plain(values.std())}
    first = evaluated[0]
    return {
        "sanity_images": len(checked),
        "images": len(evaluated),
        "baseline": first["baseline"],
        "steps": first["steps"],
        "random_orders": first["random_orders"],
        "maps": maps,
        "random": random,
        "published": PUBLISHED,
    }
