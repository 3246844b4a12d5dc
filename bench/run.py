#!/usr/bin/env python3
"""Benchmark of ``reportgen build`` against the model's own forward pass (issues 6 and 17).

Run by hand (it is not part of the test suite)::

    python bench/run.py [--images N] [--model NAME] [--input-size S] [--batch-size B]

It measures the reportgen of the checkout it lives in (put first on the path, here and in every
child process).

It writes N distinct images (the sample photos in ``images/``, each copy with its own brightness
change and pixel noise, so the bytes differ and the manifest's boxes stay valid) and a manifest
with random weights and no detector into a temporary folder, then measures, in one run:

1. the floor: the model's plain batched ``forward_features`` (timm's default fused attention,
   ``torch.inference_mode()``, eval) over the same images, preprocessed before timing;
2. a cold ``python3 -m reportgen.cli build MANIFEST -o OUT --quiet --force`` (subprocess, so Python
   and torch imports count);
3. a warm rebuild with nothing changed; 4. a rebuild after one image's bytes changed;
5. a rebuild after only a caption changed;
   peak memory (the child's own peak RSS, VmHWM via ``bench/peak.py``) of cold builds of N and N/8 images;
6. a cold build of a few images with ``imgfocus-vits14`` at 518 px (1370 tokens) and its peak
   memory, against what holding every layer's per-head attention would cost (L*H*N*N*4 bytes per
   image);
7. each map method through the Python API against its own floor (``bench/methods.py``): the bare
   forward for attention and rollout, a bare forward + backward for the gradient methods;
8. ``--evaluate`` on a few images against its floor, the bare batched forwards of the same
   perturbed inputs (``bench/evaluate.py``);
9. rollout's reducer work at 518 px (1370 tokens) against the bare forward of the same batch;
   cold builds of 16 and 48 images (the cost of one more image) and of 128 images, each a new
   process;

and, in this process, the same builds through :func:`reportgen.builder.build` with timers wrapped
around its stages (model load, forward pass, attention capture, experiments, figures, pages) and
counters on model loads and images run, to verify what the rebuilds recompute, and the CPU time
of each stage around the model per image.

Finally it prints every time, ratio and whether each target holds (PASS/FAIL).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Measure the reportgen of this checkout (here and in every child), not whichever one is installed.
sys.path.insert(1, str(REPO))
SAMPLES = REPO / "images"
BIG_MODEL = "imgfocus-vits14"
PYTHON = sys.executable or "python3"
PEAK_SCRIPT = REPO / "bench" / "peak.py"


# --------------------------------------------------------------------------------------------
# Inputs: distinct images and manifests
# --------------------------------------------------------------------------------------------


def sample_entries() -> list[dict]:
    """The sample manifest's image entries (kinds, boxes, titles), paths made absolute."""
    data = yaml.safe_load((SAMPLES / "manifest.yaml").read_text(encoding="utf-8"))
    entries = []
    for item in data["images"]:
        entries.append({**item, "path": str((SAMPLES / item["path"]).resolve())})
    return entries


def vary(source: Path, seed: int) -> Image.Image:
    """A copy of ``source`` with a brightness change and light noise chosen by ``seed``.

    Geometry is untouched, so the sample's boxes stay valid; the noise makes the bytes differ for
    every seed.
    """
    rng = np.random.default_rng(seed)
    with Image.open(source) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    gain = 0.85 + 0.3 * rng.random()  # brightness x0.85 .. x1.15
    noise = rng.normal(0.0, 2.0, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr * gain + noise, 0, 255).round().astype(np.uint8), "RGB")


def write_varied(source: Path, target: Path, seed: int) -> None:
    vary(source, seed).save(target, format="PNG", compress_level=6)


def make_images(folder: Path, count: int) -> list[dict]:
    """``count`` distinct PNGs in ``folder``, cycling through the samples; manifest entries."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = sample_entries()
    entries = []
    for i in range(count):
        sample = samples[i % len(samples)]
        copy = i // len(samples)
        image_id = f"{sample['id']}-{copy:03d}"
        target = folder / f"{image_id}.png"
        write_varied(Path(sample["path"]), target, seed=i)
        entry = {
            "path": f"images/{target.name}",
            "id": image_id,
            "title": f"{sample.get('title', sample['id'])} (copy {copy})",
            "caption": sample.get("caption", ""),
            "kind": sample.get("kind", "single"),
        }
        if sample.get("objects"):
            entry["objects"] = [dict(o) for o in sample["objects"]]
        entries.append({"entry": entry, "source": sample["path"], "file": target})
    return entries


def model_section(name: str, input_size: int | None) -> dict:
    section: dict = {"name": name}
    if name != BIG_MODEL:
        section["pretrained"] = False  # random weights: model hubs are unreachable
    if input_size:
        section["input_size"] = input_size
    return section


def write_manifest(path: Path, model: dict, images: list[dict], title: str) -> Path:
    data = {
        "title": title,
        "model": model,
        "attention": {"head_fusion": "mean", "discard_ratio": 0.0},
        "detector": {"name": "none"},
        "output": {"cmap": "inferno", "alpha": 0.5},
        "images": [i["entry"] for i in images],
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Subprocesses: wall time and the child's own peak RSS
# --------------------------------------------------------------------------------------------


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # no hub: fail at once instead of retrying
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_child(args: list[str], cwd: Path) -> dict:
    """Run ``args`` (``[PYTHON, "-m" or "-c", ...]``); wall seconds, the child's own peak RSS
    (bytes; ``VmHWM`` written at its exit by ``bench/peak.py``, not ``os.wait4``'s ``ru_maxrss``,
    which counts this process's memory too), CPU seconds, output."""
    assert args[0] == PYTHON and args[1] in ("-m", "-c"), args
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as scratch:
        peak_file = Path(scratch) / "peak"
        env = {**child_env(), "REPORTGEN_BENCH_PEAK": str(peak_file)}
        started = time.perf_counter()
        proc = subprocess.Popen([PYTHON, str(PEAK_SCRIPT), *args[1:]], stdout=out, stderr=err, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        peak = peak_file.read_text(encoding="ascii") if peak_file.exists() else ""
    return {
        "seconds": seconds,
        "maxrss": int(peak) * 1024 if peak else float("nan"),  # KiB in /proc
        "cpu": usage.ru_utime + usage.ru_stime,
        "rc": proc.returncode,
        "stdout": stdout,
        "stderr": stderr,
    }


def cli_build(manifest: Path, output: Path, batch_size: int, force: bool) -> dict:
    args = [PYTHON, "-m", "reportgen.cli", "build", str(manifest), "-o", str(output), "--quiet",
            "--batch-size", str(batch_size)]
    if force:
        args.append("--force")
    result = run_child(args, cwd=manifest.parent)
    if result["rc"] != 0:
        sys.stderr.write(result["stderr"][-4000:])
        raise SystemExit(f"bench: reportgen build exited with {result['rc']} ({' '.join(args)})")
    return result


def watch_rebuilds(manifest: Path, output: Path, batch_size: int, edits: list) -> list[dict]:
    """Start ``reportgen build --watch`` on an up-to-date site, wait until it has loaded the model,
    then apply each edit (a function changing one image) and time it: from the write to the
    program's "Wrote" line, and the rebuild's own time from that line."""
    args = [PYTHON, "-m", "reportgen.cli", "build", str(manifest), "-o", str(output), "--batch-size", str(batch_size), "--watch"]
    proc = subprocess.Popen(args, cwd=manifest.parent, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put((time.perf_counter(), x.rstrip())) for x in proc.stderr], daemon=True).start()

    def until(text: str, timeout: float = 300) -> tuple[float, str]:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            try:
                at, found = lines.get(timeout=1)
            except queue.Empty:
                continue
            if text in found:
                return at, found
        raise SystemExit(f"bench: --watch never printed {text!r}")

    results = []
    try:
        until("Wrote ")
        until("watching")  # after the model was loaded and kept
        for edit in edits:
            started, cpu = time.perf_counter(), proc_cpu(proc.pid)
            edit()
            at, found = until("Wrote ")
            own = re.search(r", ([0-9.]+) s(?: in total)?\)$", found)
            results.append({"seconds": at - started, "build": float(own.group(1)) if own else float("nan"), "line": found,
                            "cpu": proc_cpu(proc.pid) - cpu})
            until("watching")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return results


def figure_inodes(output: Path) -> dict[str, int]:
    """Inode of each image's thumbnail: a reused image keeps its (hard-linked) file."""
    found = {}
    for folder in sorted((output / "figures").iterdir()):
        thumb = next((folder / name for name in ("thumb.jpg", "thumb.png") if (folder / name).is_file()), folder / "thumb.jpg")
        if thumb.is_file():
            found[folder.name] = thumb.stat().st_ino
    return found


def recomputed(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return [slug for slug, ino in after.items() if before.get(slug) != ino]


BASELINE_SNIPPET = r"""
import json, resource, sys
import reportgen.builder  # noqa: F401  (with reportgen.compute: everything a build imports)
import reportgen.compute  # noqa: F401
from reportgen.config import load_manifest
from reportgen.model.loading import load_model
m = load_manifest(sys.argv[1])
loaded = load_model(m.model, "cpu")
model = loaded.model
attn = model.blocks[0].attn
print(json.dumps({
    "depth": len(model.blocks),
    "heads": int(attn.num_heads),
    "tokens": int(loaded.num_prefix_tokens + loaded.grid[0] * loaded.grid[1]),
    "fused": bool(getattr(attn, "fused_attn", False)),
}))
"""


# --------------------------------------------------------------------------------------------
# In-process timers
# --------------------------------------------------------------------------------------------


class Profiler:
    """Inclusive wall time and CPU time of the calling thread (``time.thread_time``) per call path
    (``outer > inner``), per thread; counters.

    The thread's CPU clock leaves out torch's intra-op worker threads, so it undercounts large
    torch operations (the forward pass, the reducers); the stages around the model are Python,
    NumPy and PIL work on the thread that calls them.
    """

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.cpu_totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.counters: dict[str, int] = defaultdict(int)
        self._local = threading.local()
        self._restore: list[tuple[object, str, object]] = []

    def _stack(self) -> list[str]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def timed(self, name: str, func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            stack = self._stack()
            path = " > ".join([*stack, name])
            stack.append(name)
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return func(*args, **kwargs)
            finally:
                self.totals[path] += time.perf_counter() - started
                self.cpu_totals[path] += time.thread_time() - cpu
                self.calls[path] += 1
                stack.pop()

        return wrapper

    def patch(self, owner, attr: str, name: str | None = None, make=None) -> None:
        """Wrap ``owner.attr`` (skipped if the code under test no longer has it)."""
        if (owner.__dict__ if isinstance(owner, type) else vars(owner)).get(attr) is None:
            return
        original = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        replacement = make(original) if make else self.timed(name or attr, original)
        setattr(owner, attr, replacement)
        self._restore.append((owner, attr, original))

    def unpatch(self) -> None:
        for owner, attr, original in reversed(self._restore):
            setattr(owner, attr, original)
        self._restore.clear()

    def total(self, path: str) -> float:
        return self.totals.get(path, 0.0)

    def cpu_total(self, path: str) -> float:
        return self.cpu_totals.get(path, 0.0)

    def sum_suffix(self, name: str, cpu: bool = False) -> float:
        """Total (wall, or thread CPU) of every path ending in ``name`` that is not nested in another ``name``."""
        totals = self.cpu_totals if cpu else self.totals
        return sum(t for p, t in totals.items() if p.split(" > ")[-1] == name and p.split(" > ").count(name) == 1)


@contextmanager
def instrumented():
    """Wrap reportgen's build stages with timers; yield the profiler; restore on exit."""
    import reportgen.builder as build_mod
    import reportgen.compute as compute_mod
    import reportgen.experiments as experiments_mod
    import reportgen.methods.attention as attention_mod
    import reportgen.methods.rollout as rollout_mod
    import reportgen.model.capture as capture_mod
    import reportgen.model.runner as runner_mod
    import reportgen.site.figures as figures_mod
    import reportgen.site.writer as writer_mod

    prof = Profiler()
    # The build's phases and the model stage, as they call each other (names bound in each module).
    for attr in ("write_colourbar", "write_site", "image_record", "image_key", "read_status", "reuse", "swap_in",
                 "make_staging"):
        prof.patch(build_mod, attr)
    for attr in ("load_model", "_prepare", "explain"):
        prof.patch(compute_mod, attr)
    for attr in ("attention_experiment", "rollout_experiment", "objects_experiment"):
        prof.patch(experiments_mod, attr)
    prof.patch(writer_mod, "write_image_figures")

    def counting_run(original):
        timed = prof.timed("ModelRunner.run", original)

        def run(self, batch, *args, **kwargs):
            prof.counters["images run through the model"] += int(batch.shape[0])
            prof.counters["forward passes"] += 1
            return timed(self, batch, *args, **kwargs)

        return run

    prof.patch(runner_mod.ModelRunner, "run", make=counting_run)
    prof.patch(rollout_mod._Rollout, "update", "rollout reducer (each layer's factor)")
    prof.patch(rollout_mod._Rollout, "kept", "rollout rows (vector-matrix products, .cpu)")
    prof.patch(attention_mod._LastLayer, "update", "attention reducer (last layer's head mean)")

    def timed_hook_factory(original):
        def factory(self, index, module):
            return prof.timed("qkv hook (attention = softmax(qk^T) + reducers)", original(self, index, module))

        return factory

    prof.patch(capture_mod.AttentionCapture, "_from_qkv", make=timed_hook_factory)
    # The build's own thread waiting for the figure thread (figures themselves overlap the model).
    prof.patch(writer_mod.FigureWriter, "_collect", "waiting for figures")
    # Figure writers, as write_image_figures calls them (names bound in reportgen.site.figures): the
    # known ones and any other write_* function.
    writers = {"save_png", "overlay", "_save_figure"} | {
        a for a in vars(figures_mod) if a.startswith("write_") and a not in ("write_image_figures", "write_colourbar")
    }
    for attr in sorted(writers):
        if callable(getattr(figures_mod, attr, None)):
            prof.patch(figures_mod, attr)
    try:
        yield prof
    finally:
        prof.unpatch()


def inprocess_build(manifest_path: Path, output: Path, batch_size: int, force: bool) -> tuple[float, Profiler, object]:
    from reportgen.builder import BuildOptions, build
    from reportgen.config import load_manifest

    with instrumented() as prof:
        started, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
        manifest = load_manifest(manifest_path)
        report = build(manifest, BuildOptions(output=output, device="cpu", batch_size=batch_size, force=force))
        seconds = time.perf_counter() - started
        prof.cpu = time.process_time() - cpu  # every thread of the process
        prof.main_cpu = time.thread_time() - main_cpu  # the build's own thread alone
    if report.failed:
        raise SystemExit(f"bench: in-process build had failed images: {report.failed}")
    prof.counters["model loads"] = prof.calls.get("load_model", 0)
    return seconds, prof, report


# --------------------------------------------------------------------------------------------
# The floor
# --------------------------------------------------------------------------------------------


def measure_floor(manifest_path: Path, batch_size: int, repeats: int) -> dict:
    import torch

    from reportgen.config import load_manifest
    from reportgen.imaging import open_image, preprocess
    from reportgen.model.loading import load_model

    manifest = load_manifest(manifest_path)
    started = time.perf_counter()
    loaded = load_model(manifest.model, "cpu")
    load_seconds = time.perf_counter() - started
    model = loaded.model.eval()
    started = time.perf_counter()
    tensors = [preprocess(open_image(e.path), loaded.data_config)[0] for e in manifest.images]
    preprocess_seconds = time.perf_counter() - started
    batches = [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
    fused = sum(bool(getattr(b.attn, "fused_attn", False)) for b in model.blocks)
    with torch.inference_mode():
        started = time.perf_counter()
        model.forward_features(batches[0])  # warm-up: first-call allocations and kernel selection
        first = time.perf_counter() - started
        passes = []
        for _ in range(repeats):  # best of several: other processes on the CPUs only ever slow it down
            started, cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                model.forward_features(batch)
            passes.append((time.perf_counter() - started, time.process_time() - cpu))
    seconds, cpu = min(passes)
    info = {
        "seconds": seconds,
        "cpu": cpu,
        "passes": [p[0] for p in passes],
        "first_batch": first,
        "load": load_seconds,
        "preprocess": preprocess_seconds,
        "fused": f"{fused}/{len(model.blocks)} blocks fused",
        "input": tuple(batches[0].shape[1:]),
        "threads": torch.get_num_threads(),
    }
    del model, loaded, batches, tensors
    gc.collect()
    return info


# --------------------------------------------------------------------------------------------
# The work around the model, in CPU time
# --------------------------------------------------------------------------------------------

# Top-level stages of the in-process split that are not "the work around the model": loading it,
# decoding the images, and the model stage itself (the forward pass with the qkv hooks that
# capture attention and fold it into the methods' reducers). Waiting for the figure thread is no work.
NOT_AROUND = {
    "load_model": "model load",
    "ModelRunner.run": "model forward + attention capture (qkv hooks and the reducers in them)",
    "_prepare": "decoding + preprocessing (decode thread)",
    "waiting for figures": "the build waiting for the figure thread",
}
BACKGROUND = {"_prepare", "write_image_figures"}  # stages that run on their own threads
UNTIMED = "build thread outside the timed stages (manifest, batching, bookkeeping)"


def around_model_cpu(prof: Profiler) -> list[tuple[str, float]]:
    """CPU seconds (of the thread that ran it) of each stage around the model, largest first.

    The top-level stages not in :data:`NOT_AROUND`, plus what the build's own thread spent
    outside every timed stage (from its thread CPU clock over the whole build)."""
    top = {path: cpu for path, cpu in prof.cpu_totals.items() if " > " not in path}
    stages = [(path, cpu) for path, cpu in top.items() if path not in NOT_AROUND]
    timed_main = sum(cpu for path, cpu in top.items() if path not in BACKGROUND)
    stages.append((UNTIMED, max(0.0, prof.main_cpu - timed_main)))
    return sorted(stages, key=lambda item: -item[1])


# --------------------------------------------------------------------------------------------
# Rollout against the forward pass at a large input
# --------------------------------------------------------------------------------------------

ROLLOUT_FALLBACK = "vit_small_patch14_dinov2"  # timm's DINOv2 ViT-S/14, the offline model's architecture


def measure_rollout(work: Path, images: list[dict], model_name: str | None, size: int, repeats: int) -> dict:
    """Rollout's reducer work (``_Rollout.update`` per layer + ``kept``) over one batch against the
    bare forward of the same batch, in process, best of ``repeats`` interleaved rounds.

    Each round: the bare ``forward_features`` (inference mode, fused attention as the model has
    it), then the same forward under :class:`~reportgen.model.capture.AttentionCapture`, whose
    callback hands each layer's ``[B, H, N, N]`` attention to a rollout reducer, as the build's
    model stage does; only the reducer's calls are timed, not the capture's softmax.
    """
    import torch

    from reportgen.config import load_manifest
    from reportgen.errors import ModelLoadError
    from reportgen.imaging import open_image, preprocess
    from reportgen.methods.rollout import RolloutMethod
    from reportgen.model.loading import load_model

    def load(name: str):
        manifest = load_manifest(write_manifest(work / "manifest-rollout.yaml", model_section(name, size), images, "Rollout"))
        return manifest, load_model(manifest.model, "cpu")

    if model_name is None:  # the offline model if installed, else its architecture with random weights
        try:
            model_name = BIG_MODEL
            manifest, loaded = load(model_name)
        except ModelLoadError:
            model_name = ROLLOUT_FALLBACK
            manifest, loaded = load(model_name)
    else:
        manifest, loaded = load(model_name)
    adapter, layout = loaded.adapter, loaded.layout
    method = RolloutMethod(manifest.attention.head_fusion, manifest.attention.discard_ratio, manifest.attention.rollout_start_layer)
    batch = torch.stack([preprocess(open_image(e.path), loaded.data_config)[0] for e in manifest.images])
    tokens = layout.num_prefix_tokens + layout.grid[0] * layout.grid[1]
    loaded.model.eval()

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def since(start: tuple[float, float]) -> tuple[float, float]:
        now = clocks()
        return now[0] - start[0], now[1] - start[1]

    bare_runs, rollout_runs, captured_runs = [], [], []
    with torch.inference_mode():
        adapter.forward_features(batch)  # warm-up
        for _ in range(repeats):
            start = clocks()
            adapter.forward_features(batch)
            bare_runs.append(since(start))

            reducer = method.reducer(adapter.depth, layout)
            spent = [0.0, 0.0]

            def on_layer(index: int, attn: torch.Tensor, reducer=reducer, spent=spent) -> None:
                start = clocks()
                reducer.update(index, attn)
                wall, cpu = since(start)
                spent[0] += wall
                spent[1] += cpu

            start = clocks()
            with adapter.attention_capture(on_layer) as capture:
                capture.begin()
                adapter.forward_features(batch)
                capture.check_complete()
            kept_start = clocks()
            rows = reducer.kept()["query_by_layer"]
            wall, cpu = since(kept_start)
            captured_runs.append(since(start))
            spent[0] += wall
            spent[1] += cpu
            rollout_runs.append(tuple(spent))
    if tuple(rows.shape) != (batch.shape[0], adapter.depth, tokens):
        raise SystemExit(f"bench: rollout rows have shape {tuple(rows.shape)}, expected {(batch.shape[0], adapter.depth, tokens)}")
    result = {
        "model": model_name,
        "images": int(batch.shape[0]),
        "input": tuple(batch.shape[1:]),
        "tokens": tokens,
        "depth": adapter.depth,
        "bare": min(bare_runs),
        "rollout": min(rollout_runs),
        "captured": min(captured_runs),
        "bare_runs": bare_runs,
        "rollout_runs": rollout_runs,
    }
    del loaded, adapter, batch
    gc.collect()
    return result


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def secs(s: float, cpu: float | None = None) -> str:
    """Wall seconds, and the CPU seconds of the same work next to them when known."""
    return f"{s:8.2f} s" + (f" (cpu {cpu:.2f} s)" if cpu is not None else "")


def line(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<58} {value}{('   ' + note) if note else ''}")


def print_tree(prof: Profiler, images: int, build_seconds: float) -> None:
    print(f"  {'stage (inclusive; nested stages indented)':<76} {'total':>9} {'calls':>6} {'ms/image':>9} {'share':>6} "
          f"{'cpu ms/image':>13}")
    background = {"_prepare": "decode thread", "write_image_figures": "figure thread"}
    for path in sorted(prof.totals, key=lambda p: (p.split(" > ")[0] in background, p)):
        parts = path.split(" > ")
        total = prof.totals[path]
        label = "  " * (len(parts) - 1) + parts[-1]
        if parts[0] in background:
            label += f"  [{background[parts[0]]}, overlaps]"
        print(f"  {label:<76} {total:8.2f}s {prof.calls[path]:6d} {1000 * total / max(images, 1):9.1f} "
              f"{100 * total / build_seconds:5.1f}% {1000 * prof.cpu_totals[path] / max(images, 1):13.1f}")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="number of images (default 32)")
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm ViT name (random weights)")
    parser.add_argument("--input-size", type=int, default=None, help="square input size (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8, as the CLI)")
    parser.add_argument("--floor-repeats", type=int, default=3, help="timed passes for the floor; the best counts (default 3)")
    parser.add_argument("--big-images", type=int, default=4, help=f"images for the {BIG_MODEL} 518 px run (0 skips it)")
    parser.add_argument("--big-size", type=int, default=518, help=f"input size of the {BIG_MODEL} run")
    parser.add_argument("--methods-images", type=int, default=16,
                        help="images for the per-method costs against their floors (0 skips them)")
    parser.add_argument("--evaluate-images", type=int, default=4,
                        help="images for the --evaluate run against its floor (0 skips it; see bench/evaluate.py)")
    parser.add_argument("--marginal-images", type=int, nargs=2, default=[16, 48], metavar=("SMALL", "LARGE"),
                        help="cold builds (new processes) of SMALL and LARGE images for the cost of one more image "
                             "(default 16 48; 0 0 skips them)")
    parser.add_argument("--marginal-repeats", type=int, default=2,
                        help="cold builds of each of SMALL and LARGE, interleaved; the fastest counts (default 2)")
    parser.add_argument("--large-images", type=int, default=128,
                        help="images for the large cold build as a new process (default 128, 0 skips it)")
    parser.add_argument("--rollout-images", type=int, default=4,
                        help="images (one batch) for rollout against the forward at --rollout-size (default 4, 0 skips it)")
    parser.add_argument("--rollout-size", type=int, default=518, help="input size of the rollout run (default 518)")
    parser.add_argument("--rollout-model", default=None,
                        help=f"model of the rollout run (default: {BIG_MODEL} if installed, else {ROLLOUT_FALLBACK}, random weights)")
    parser.add_argument("--rollout-repeats", type=int, default=3, help="interleaved rounds of the rollout run; the best counts (default 3)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep inputs and sites here (default: a temp dir, removed)")
    args = parser.parse_args()
    if args.images < 1:
        parser.error("--images must be at least 1")
    small_m, large_m = args.marginal_images
    if (small_m or large_m) and not 1 <= small_m < large_m:
        parser.error("--marginal-images needs 1 <= SMALL < LARGE (or 0 0 to skip)")
    if min(args.marginal_repeats, args.rollout_repeats, args.floor_repeats) < 1:
        parser.error("--marginal-repeats, --rollout-repeats and --floor-repeats must be at least 1")
    if min(args.large_images, args.rollout_images) < 0:
        parser.error("--large-images and --rollout-images must be at least 0")

    n = args.images
    small_n = max(1, n // 8)
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="reportgen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    keep = args.workdir is not None
    try:
        return _bench(args, n, small_n, work)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _bench(args, n: int, small_n: int, work: Path) -> int:
    import torch

    import reportgen

    print(f"reportgen benchmark: {n} images, model {args.model} (random weights), "
          f"input size {args.input_size or 'default'}, batch size {args.batch_size}")
    print(f"  reportgen {reportgen.__version__} from {Path(reportgen.__file__).parent}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, python {sys.version.split()[0]}")
    print(f"  work folder {work}")
    print(f"  load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          "(other processes on these CPUs inflate every wall time; cpu seconds are printed alongside)")

    # One pool of distinct images; each build takes the first K of them.
    pool = make_images(work / "images", max(n, args.marginal_images[1], args.large_images, args.rollout_images))
    images = pool[:n]
    model = model_section(args.model, args.input_size)
    manifest = write_manifest(work / "manifest.yaml", model, images, f"Benchmark, {n} images")
    manifest_small = write_manifest(work / "manifest-small.yaml", model, images[:small_n], f"Benchmark, {small_n} images")
    total_bytes = sum(i["file"].stat().st_size for i in images)
    print(f"  {n} distinct PNGs ({mib(total_bytes)}), kinds: "
          f"{sum(i['entry']['kind'] == 'multi' for i in images)} multi, {sum(i['entry']['kind'] == 'single' for i in images)} single; detector none")

    # ---- import cost (what every subprocess build pays before any work) ----
    print("\n[0] start-up cost of a build subprocess")
    imports = run_child([PYTHON, "-c", "import reportgen.cli, reportgen.builder, reportgen.config"], cwd=work)
    cli_version = run_child([PYTHON, "-m", "reportgen.cli", "--version"], cwd=work)
    line("python3 -c 'import reportgen.cli, reportgen.builder'", secs(imports["seconds"], imports["cpu"]), mib(imports["maxrss"]))
    line("python3 -m reportgen.cli --version", secs(cli_version["seconds"], cli_version["cpu"]))
    line("python3 -c 'import torch' / 'import timm'",
         " / ".join(f"{run_child([PYTHON, '-c', f'import {m}'], cwd=work)['seconds']:.2f} s" for m in ("torch", "timm")))

    # ---- (1) floor ----
    print("\n[1] floor: plain batched forward_features, inference_mode, eval (preprocessing done before)")
    floor = measure_floor(manifest, args.batch_size, args.floor_repeats)
    line(f"forward of {n} images, input {floor['input']}, {floor['fused']}", secs(floor["seconds"], floor["cpu"]),
         f"{1000 * floor['seconds'] / n:.0f} ms/image "
         f"(best of {len(floor['passes'])}: {', '.join(f'{p:.2f}' for p in floor['passes'])} s)")
    line("  (not in the floor) warm-up batch / load_model / decode+preprocess",
         f"{floor['first_batch']:.2f} s / {floor['load']:.2f} s / {floor['preprocess']:.2f} s")

    # ---- (2)-(5) subprocess builds ----
    out = work / "site"
    print("\n[2-5] reportgen build as a subprocess (python3 -m reportgen.cli build ... --quiet)")
    cold = cli_build(manifest, out, args.batch_size, force=True)
    line(f"(2) cold build, {n} images (--force)", secs(cold["seconds"], cold["cpu"]),
         f"peak RSS {mib(cold['maxrss'])}, {1000 * cold['seconds'] / n:.0f} ms/image")
    before = figure_inodes(out)
    warm = cli_build(manifest, out, args.batch_size, force=False)
    after = figure_inodes(out)
    warm_recomputed = recomputed(before, after)
    line("(3) warm rebuild, nothing changed", secs(warm["seconds"], warm["cpu"]),
         f"images recomputed: {len(warm_recomputed)}, peak RSS {mib(warm['maxrss'])}")
    changed = images[0]
    write_varied(Path(changed["source"]), changed["file"], seed=10_000)
    before = after
    one = cli_build(manifest, out, args.batch_size, force=False)
    after = figure_inodes(out)
    one_recomputed = recomputed(before, after)
    line(f"(4) rebuild after one image changed ({changed['entry']['id']})", secs(one["seconds"], one["cpu"]),
         f"images recomputed: {len(one_recomputed)} {one_recomputed}, peak RSS {mib(one['maxrss'])}")
    images[0]["entry"]["caption"] = images[0]["entry"]["caption"] + " (caption edited by the benchmark)"
    write_manifest(manifest, model, images, f"Benchmark, {n} images")
    before = after
    caption = cli_build(manifest, out, args.batch_size, force=False)
    after = figure_inodes(out)
    caption_recomputed = recomputed(before, after)
    caption_in_page = "caption edited by the benchmark" in (out / f"{images[0]['entry']['id']}.html").read_text(encoding="utf-8") \
        if (out / f"{images[0]['entry']['id']}.html").is_file() else None
    line("(5) rebuild after one caption changed", secs(caption["seconds"], caption["cpu"]),
         f"images recomputed: {len(caption_recomputed)}, new caption on the page: {caption_in_page}, peak RSS {mib(caption['maxrss'])}")

    print("\n[4w] one image changed, under reportgen build --watch (model loaded once, kept between rebuilds)")
    edits = [lambda i=i: write_varied(Path(images[i]["source"]), images[i]["file"], seed=30_000 + i) for i in (2, 3, 4)]
    watched = watch_rebuilds(manifest, out, args.batch_size, edits)
    for i, w in zip((2, 3, 4), watched):
        line(f"  {images[i]['entry']['id']} changed: write -> page rewritten", secs(w["seconds"], w["cpu"]),
             f"the rebuild itself {w['build']:.2f} s (the rest is polling and waiting for the write to settle)")
    watch_one = min(w["build"] for w in watched)
    watch_wall = max(w["seconds"] for w in watched)

    print("\n[mem] cold builds, each in its own subprocess (the child's own peak RSS, VmHWM)")
    small = cli_build(manifest_small, work / "site-small", args.batch_size, force=True)
    line(f"cold build, N = {n} images", mib(cold["maxrss"]), f"{cold['seconds']:.2f} s (cpu {cold['cpu']:.2f} s)")
    line(f"cold build, N/8 = {small_n} images", mib(small["maxrss"]), f"{small['seconds']:.2f} s (cpu {small['cpu']:.2f} s)")
    base = run_child([PYTHON, "-c", BASELINE_SNIPPET, str(manifest)], cwd=work)
    line("baseline: imports + load_model, no image", mib(base["maxrss"]), f"{base['seconds']:.2f} s (cpu {base['cpu']:.2f} s)")

    # ---- cold builds at other N, each a new process ----
    marginal = large = None
    if args.marginal_images[1]:
        small_m, large_m = args.marginal_images
        print(f"\n[scale] one more image: cold builds of {small_m} and {large_m} images, each a new process, "
              f"{args.marginal_repeats} of each interleaved (the fastest counts)")
        runs: dict[int, list[dict]] = {small_m: [], large_m: []}
        for _ in range(args.marginal_repeats):
            for count in (small_m, large_m):
                manifest_k = write_manifest(work / f"manifest-{count}.yaml", model, pool[:count], f"Benchmark, {count} images")
                result = cli_build(manifest_k, work / f"site-{count}", args.batch_size, force=True)
                runs[count].append(result)
                line(f"cold build, {count} images", secs(result["seconds"], result["cpu"]),
                     f"{1000 * result['seconds'] / count:.0f} ms/image, peak RSS {mib(result['maxrss'])}")
        best = {count: min(r["seconds"] for r in rs) for count, rs in runs.items()}
        best_cpu = {count: min(r["cpu"] for r in rs) for count, rs in runs.items()}
        marginal = {
            "small": small_m, "large": large_m,
            "seconds": (best[large_m] - best[small_m]) / (large_m - small_m),
            "cpu": (best_cpu[large_m] - best_cpu[small_m]) / (large_m - small_m),
        }
        line(f"one more image: ({large_m} - {small_m} images) / {large_m - small_m}", secs(marginal["seconds"], marginal["cpu"]),
             "fastest build of each (wall); cpu from the least cpu of each")
    if args.large_images:
        print(f"\n[scale] cold build of {args.large_images} images as a new process")
        manifest_large = write_manifest(work / "manifest-large.yaml", model, pool[: args.large_images],
                                        f"Benchmark, {args.large_images} images")
        large = cli_build(manifest_large, work / "site-large", args.batch_size, force=True)
        line(f"cold build, {args.large_images} images", secs(large["seconds"], large["cpu"]),
             f"{1000 * large['seconds'] / args.large_images:.0f} ms/image, peak RSS {mib(large['maxrss'])}")

    # ---- in-process split and rebuild checks ----
    print(f"\n[split] in-process reportgen.builder.build, cold (force), {n} images, imports already done")
    site_in = work / "site-inprocess"
    in_cold, prof, _ = inprocess_build(manifest, site_in, args.batch_size, force=True)
    line("in-process cold build total", secs(in_cold, prof.cpu), f"{1000 * in_cold / n:.0f} ms/image (cpu of every thread)")
    print_tree(prof, n, in_cold)
    run_total = prof.total("ModelRunner.run")
    hooks = prof.sum_suffix("qkv hook (attention = softmax(qk^T) + reducers)")
    net_forward = run_total - hooks
    load = prof.total("load_model")
    experiments = prof.total("explain")
    figures = prof.total("write_image_figures")
    waiting = prof.sum_suffix("waiting for figures")
    pages = prof.total("write_site") + prof.total("write_colourbar") + prof.sum_suffix("image_record")
    report_cost = in_cold - load - net_forward
    other = in_cold - load - run_total - experiments - waiting - pages
    load_cpu = prof.cpu_total("load_model")
    pages_cpu = prof.cpu_total("write_site") + prof.cpu_total("write_colourbar") + prof.sum_suffix("image_record", cpu=True)
    print("  summary of the in-process cold build (cpu: of the thread that ran the stage; torch's worker threads not counted):")
    line("  model load (load_model)", secs(load, load_cpu), f"{100 * load / in_cold:.0f}%")
    line("  model forward, net of capture hooks", secs(net_forward),
         f"{1000 * net_forward / n:.0f} ms/image ({net_forward / floor['seconds']:.2f} x the first floor), {100 * net_forward / in_cold:.0f}%")
    line("  attention capture + rollout (qkv hooks)", secs(hooks, prof.sum_suffix("qkv hook (attention = softmax(qk^T) + reducers)", cpu=True)),
         f"{1000 * hooks / n:.0f} ms/image, {100 * hooks / in_cold:.0f}%")
    line("  experiments (attention, rollout, objects)", secs(experiments, prof.cpu_total("explain")),
         f"{1000 * experiments / n:.0f} ms/image, {100 * experiments / in_cold:.0f}%")
    line("  figures (write_image_figures, in the figure thread)", secs(figures, prof.cpu_total("write_image_figures")),
         f"{1000 * figures / n:.0f} ms/image, overlapping the model")
    line("    of which the build waited for", secs(waiting), f"{100 * waiting / in_cold:.0f}%")
    line("  pages + results.json + records (write_site, image_record)", secs(pages, pages_cpu),
         f"{1000 * pages / n:.0f} ms/image, {100 * pages / in_cold:.0f}%")
    line("  everything else (hashing, staging, swap, waiting for decode)", secs(other), f"{100 * other / in_cold:.0f}%")
    line("  build minus load minus net forward", secs(report_cost),
         f"{report_cost / net_forward:.2f} x the net forward (flatters overlap: the figure thread slows the forward)")

    # The work around the model in CPU time: what a faster forward pass (a GPU) leaves to pay per image.
    around_stages = around_model_cpu(prof)
    around_cpu = sum(cpu for _, cpu in around_stages)
    print(f"\n[around] the work around the model, besides decoding and capturing attention: cpu ms per image "
          f"(thread cpu of each stage; not counted: {', '.join(NOT_AROUND)})")
    for label, cpu in around_stages:
        wall = f"wall {prof.total(label):.2f} s" if label in prof.totals else "from the build thread's cpu clock"
        line(f"  {label}", f"{1000 * cpu / n:8.1f} ms/image", f"cpu {cpu:.2f} s, {wall}")
        nested = sorted(((c, path) for path, c in prof.cpu_totals.items()
                         if path.startswith(label + " > ") and path.count(" > ") == 1), reverse=True)
        for c, path in nested:
            line(f"    {path.split(' > ')[-1]}", f"{1000 * c / n:8.1f} ms/image", f"cpu {c:.2f} s, wall {prof.total(path):.2f} s")
    line("  total around the model", f"{1000 * around_cpu / n:8.1f} ms/image", f"cpu {around_cpu:.2f} s for {n} images")
    reducers = {name: prof.sum_suffix(name, cpu=True) for name in (
        "rollout reducer (each layer's factor)", "attention reducer (last layer's head mean)", "rollout rows (vector-matrix products, .cpu)")}
    print("  not counted above (inside the model stage; thread cpu, so torch's worker threads are missing):")
    for name, cpu in reducers.items():
        line(f"    {name}", f"{1000 * cpu / n:8.1f} ms/image")
    decode_cpu = prof.cpu_total("_prepare")
    line("    decoding + preprocessing (decode thread)", f"{1000 * decode_cpu / n:8.1f} ms/image")
    line("  cross-check, process cpu: build - load_model - first floor", f"{1000 * (prof.cpu - load_cpu - floor['cpu']) / n:8.1f} ms/image",
         "every thread; includes decoding, capture, reducers, torch's spinning workers")

    print("\n[1b] floor again, now that the build's own forward time is known (best of all passes counts)")
    again = measure_floor(manifest, args.batch_size, args.floor_repeats)
    line(f"forward of {n} images", secs(again["seconds"], again["cpu"]),
         f"(passes: {', '.join(f'{p:.2f}' for p in again['passes'])} s)")
    if again["seconds"] < floor["seconds"]:
        floor.update(seconds=again["seconds"], cpu=again["cpu"])
    floor["passes"] = floor["passes"] + again["passes"]
    line("floor used below (best pass of both measurements)", secs(floor["seconds"], floor["cpu"]),
         f"{1000 * floor['seconds'] / n:.0f} ms/image")

    print("\n[verify] in-process rebuilds of that site, counting model loads and images run")
    in_warm, prof_warm, rep_warm = inprocess_build(manifest, site_in, args.batch_size, force=False)
    line("warm rebuild, nothing changed", secs(in_warm, prof_warm.cpu),
         f"model loads {prof_warm.counters['model loads']}, images run {prof_warm.counters['images run through the model']}, reused {rep_warm.reused}")
    second = images[min(1, n - 1)]
    write_varied(Path(second["source"]), second["file"], seed=20_000)
    in_one, prof_one, rep_one = inprocess_build(manifest, site_in, args.batch_size, force=False)
    line(f"one image changed ({second['entry']['id']})", secs(in_one, prof_one.cpu),
         f"model loads {prof_one.counters['model loads']}, images run {prof_one.counters['images run through the model']}, reused {rep_one.reused}")
    second["entry"]["caption"] = second["entry"]["caption"] + " (edited again)"
    write_manifest(manifest, model, images, f"Benchmark, {n} images")
    in_cap, prof_cap, rep_cap = inprocess_build(manifest, site_in, args.batch_size, force=False)
    line("one caption changed", secs(in_cap, prof_cap.cpu),
         f"model loads {prof_cap.counters['model loads']}, images run {prof_cap.counters['images run through the model']}, reused {rep_cap.reused}")
    for label, p in (("warm", prof_warm), ("caption", prof_cap)):
        top = sorted(((t, path) for path, t in p.totals.items() if " > " not in path), reverse=True)[:4]
        print(f"    {label} rebuild, largest stages: " + ", ".join(f"{path} {t:.2f}s" for t, path in top))

    # ---- (6) big model ----
    big = None
    if args.big_images > 0:
        print(f"\n[6] {BIG_MODEL} at {args.big_size} px, cold build of {args.big_images} images (subprocess)")
        big_model = model_section(BIG_MODEL, args.big_size)
        manifest_big = write_manifest(work / "manifest-big.yaml", big_model, images[: args.big_images], "Benchmark, big")
        big_base = run_child([PYTHON, "-c", BASELINE_SNIPPET, str(manifest_big)], cwd=work)
        if big_base["rc"] != 0:
            print(f"  skipped: could not load {BIG_MODEL}: {big_base['stderr'].strip().splitlines()[-1:]}")
        else:
            shape = json.loads(big_base["stdout"].strip().splitlines()[-1])
            big_run = cli_build(manifest_big, work / "site-big", args.batch_size, force=True)
            L, H, T = shape["depth"], shape["heads"], shape["tokens"]
            per_image = L * H * T * T * 4
            batch_images = min(args.batch_size, args.big_images)
            one_layer = batch_images * H * T * T * 4
            over = big_run["maxrss"] - big_base["maxrss"]
            line(f"cold build of {args.big_images} images", secs(big_run["seconds"], big_run["cpu"]),
                 f"{1000 * big_run['seconds'] / args.big_images:.0f} ms/image")
            line("peak RSS of the build", mib(big_run["maxrss"]))
            line("baseline: imports + load_model, no image", mib(big_base["maxrss"]))
            line("build peak above baseline", mib(over))
            line(f"holding every layer's per-head matrices, L*H*N*N*4 (L={L}, H={H}, N={T})", mib(per_image), "per image")
            line(f"  ... for one batch of {batch_images} images", mib(per_image * batch_images))
            line("one layer's [B,H,N,N] float32 for that batch (exists while the layer runs)", mib(one_layer))
            big = {"seconds": big_run["seconds"], "over": over, "hold_all_batch": per_image * batch_images,
                   "hold_all_image": per_image, "rss": big_run["maxrss"]}

    # ---- (8) --evaluate against the bare forwards of its perturbed inputs ----
    evaluated = None
    if args.evaluate_images > 0:
        from evaluate import measure as measure_evaluate

        print(f"\n[8] --evaluate on {args.evaluate_images} images, against the bare forwards of the same perturbed inputs")
        evaluated = measure_evaluate(model, [i["entry"] for i in images[: args.evaluate_images]], args.batch_size, work)

    # ---- (9) rollout against the bare forward at a large input ----
    rollout = None
    if args.rollout_images:
        print(f"\n[9] rollout's reducer work against the bare forward of the same batch of {args.rollout_images} images "
              f"at {args.rollout_size} px, in process, best of {args.rollout_repeats} interleaved rounds")
        rollout = measure_rollout(work, pool[: args.rollout_images], args.rollout_model, args.rollout_size, args.rollout_repeats)
        print(f"  model {rollout['model']}, input {rollout['input']}, {rollout['tokens']} tokens, {rollout['depth']} layers")
        for k, ((bw, bc), (rw, rc)) in enumerate(zip(rollout["bare_runs"], rollout["rollout_runs"]), 1):
            line(f"  round {k}: bare forward / rollout update + kept", f"{bw:.2f} s / {rw:.2f} s", f"cpu {bc:.2f} s / {rc:.2f} s")
        line("bare forward_features of the batch (best)", secs(*rollout["bare"]))
        line("rollout reducer: update per layer + kept (best)", secs(*rollout["rollout"]),
             f"{rollout['rollout'][0] / rollout['bare'][0]:.2f} x the forward")
        line("  (not counted) forward with the capture and the reducer (best)", secs(*rollout["captured"]),
             f"{rollout['captured'][0] / rollout['bare'][0]:.2f} x the bare forward: the capture's softmax(qk^T) included")

    # ---- results ----
    print("\n" + "=" * 100)
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"RESULTS ({n} images, {args.model}, batch {args.batch_size})")
    line("floor: forward_features over all images (best pass)", secs(floor["seconds"], floor["cpu"]),
         f"passes: {', '.join(f'{p:.2f}' for p in floor['passes'])} s")
    line("(2) cold build (subprocess, incl. imports and model load)", secs(cold["seconds"], cold["cpu"]),
         f"{cold['seconds'] / floor['seconds']:.2f} x floor (cpu {cold['cpu'] / floor['cpu']:.2f} x)")
    line("    cold build in-process (no imports)", secs(in_cold, prof.cpu),
         f"{in_cold / floor['seconds']:.2f} x floor (cpu {prof.cpu / floor['cpu']:.2f} x)")
    line("    ... minus load_model", secs(in_cold - load, prof.cpu - load_cpu),
         f"{(in_cold - load) / floor['seconds']:.2f} x floor (cpu {(prof.cpu - load_cpu) / floor['cpu']:.2f} x)")
    # What the build costs beyond the model: everything but loading it and the floor's forward
    # pass. Measured against the floor, not against the build's own forward time, which the
    # figure thread slows down and so would flatter the ratio.
    around = in_cold - load - floor["seconds"]
    line("    report around the model (in-process - load_model - floor)", secs(around), f"{around / floor['seconds']:.2f} x floor")
    line("    cpu seconds: floor / cold subprocess / cold in-process",
         f"{floor['cpu']:.1f} / {cold['cpu']:.1f} / {prof.cpu:.1f} s",
         f"cold = {cold['cpu'] / floor['cpu']:.2f} x floor in cpu time")
    line("(3) warm rebuild, nothing changed", secs(warm["seconds"], warm["cpu"]), f"{100 * warm['seconds'] / cold['seconds']:.1f}% of cold")
    line("(4) one image changed", secs(one["seconds"], one["cpu"]),
         f"limit cold/N + 10% cold = {cold['seconds'] / n + 0.1 * cold['seconds']:.2f} s")
    line("(5) caption changed", secs(caption["seconds"], caption["cpu"]), f"{100 * caption['seconds'] / cold['seconds']:.1f}% of cold")
    line(f"peak RSS, cold build of {n} / of {small_n} images", f"{mib(cold['maxrss'])} / {mib(small['maxrss'])}",
         f"ratio {cold['maxrss'] / small['maxrss']:.2f}")
    if big:
        line(f"(6) {BIG_MODEL} {args.big_size}px: peak above baseline vs holding all layers",
             f"{mib(big['over'])} vs {mib(big['hold_all_batch'])}")
    # Issue 17's yardsticks: the floor's forward of one image, and the floor scaled to a build's N
    # (the same batched forward, so linear in N at a fixed batch size).
    per_image, per_image_cpu = floor["seconds"] / n, floor["cpu"] / n
    line("floor per image (bare forward of one image in a batch)", secs(per_image, per_image_cpu))
    line("work around the model, per image (cpu)", f"{1000 * around_cpu / n:8.1f} ms",
         ", ".join(f"{label.split(' (')[0]} {1000 * cpu / n:.1f}" for label, cpu in around_stages[:4]) + " ms, ...")
    if marginal:
        line(f"one more image (cold {marginal['large']} - cold {marginal['small']}) / {marginal['large'] - marginal['small']}",
             secs(marginal["seconds"], marginal["cpu"]),
             f"{marginal['seconds'] / per_image:.2f} x the floor per image (cpu {marginal['cpu'] / per_image_cpu:.2f} x)")
    if large:
        line(f"cold build of {args.large_images} images (subprocess)", secs(large["seconds"], large["cpu"]),
             f"{large['seconds'] / (per_image * args.large_images):.2f} x floor "
             f"(cpu {large['cpu'] / (per_image_cpu * args.large_images):.2f} x), peak RSS {mib(large['maxrss'])}")
    if rollout:
        line(f"rollout at {args.rollout_size} px ({rollout['tokens']} tokens) vs the bare forward",
             f"{rollout['rollout'][0]:.2f} s vs {rollout['bare'][0]:.2f} s",
             f"{rollout['rollout'][0] / rollout['bare'][0]:.2f} x (cpu {rollout['rollout'][1] / rollout['bare'][1]:.2f} x)")

    targets = [
        (f"cold build <= 1.5 x floor ({cold['seconds']:.2f} s vs limit {1.5 * floor['seconds']:.2f} s; "
         f"{cold['seconds'] / floor['seconds']:.2f} x, cpu {cold['cpu'] / floor['cpu']:.2f} x)", cold["seconds"] <= 1.5 * floor["seconds"]),
        (f"report around the model <= 0.5 x the model (in-process build - load_model - floor = {around:.2f} s "
         f"vs floor {floor['seconds']:.2f} s; {around / floor['seconds']:.2f} x)",
         around <= 0.5 * floor["seconds"]),
        (f"warm rebuild <= 5% of cold ({warm['seconds']:.2f} s vs limit {0.05 * cold['seconds']:.2f} s; "
         f"{100 * warm['seconds'] / cold['seconds']:.1f}%)", warm["seconds"] <= 0.05 * cold["seconds"]),
        (f"warm rebuild loads no model (in-process: {prof_warm.counters['model loads']} loads, "
         f"{prof_warm.counters['images run through the model']} images run; subprocess: {len(warm_recomputed)} images recomputed)",
         prof_warm.counters["model loads"] == 0 and not warm_recomputed),
        (f"one image changed, new process, <= cold/N + 10% of cold ({one['seconds']:.2f} s vs limit "
         f"{cold['seconds'] / n + 0.1 * cold['seconds']:.2f} s)", one["seconds"] <= cold["seconds"] / n + 0.1 * cold["seconds"]),
        (f"one image changed under --watch <= cold/N + 10% of cold (rebuild {watch_one:.2f} s, edit to page at most "
         f"{watch_wall:.2f} s, vs limit {cold['seconds'] / n + 0.1 * cold['seconds']:.2f} s)",
         watch_wall <= cold["seconds"] / n + 0.1 * cold["seconds"]),
        (f"one image changed recomputes only that image (subprocess {len(one_recomputed)}, "
         f"in-process {prof_one.counters['images run through the model']} run)",
         len(one_recomputed) == 1 and prof_one.counters["images run through the model"] == 1),
        (f"caption change recomputes no model output (in-process: {prof_cap.counters['model loads']} loads, "
         f"{prof_cap.counters['images run through the model']} images run; subprocess: {len(caption_recomputed)} recomputed; "
         f"caption on page: {caption_in_page})",
         prof_cap.counters["model loads"] == 0 and prof_cap.counters["images run through the model"] == 0
         and not caption_recomputed and bool(caption_in_page)),
        (f"peak memory N <= 1.2 x N/8 ({mib(cold['maxrss'])} vs limit {mib(1.2 * small['maxrss'])}; "
         f"{cold['maxrss'] / small['maxrss']:.2f} x)", cold["maxrss"] <= 1.2 * small["maxrss"]),
    ]
    # Issue 17: a build that costs little more than its model.
    top = ", ".join(f"{label.split(' (')[0]} {1000 * cpu / n:.1f}" for label, cpu in around_stages[:3])
    targets.append((f"work around the model, besides decoding and capturing attention, <= 20 ms cpu per image at "
                    f"{floor['input'][-1]} px ({1000 * around_cpu / n:.1f} ms; largest: {top} ms)", around_cpu / n <= 0.020))
    if marginal:
        span = marginal["large"] - marginal["small"]
        targets.append((f"one more image (cold {marginal['large']} - cold {marginal['small']}, new processes, / {span}) "
                        f"<= 1.1 x the floor per image ({1000 * marginal['seconds']:.0f} ms vs limit {1100 * per_image:.0f} ms; "
                        f"{marginal['seconds'] / per_image:.2f} x, cpu {marginal['cpu'] / per_image_cpu:.2f} x)",
                        marginal["seconds"] <= 1.1 * per_image))
    targets.append((f"cold build in process minus load_model <= 1.2 x floor ({in_cold - load:.2f} s vs limit "
                    f"{1.2 * floor['seconds']:.2f} s; {(in_cold - load) / floor['seconds']:.2f} x, "
                    f"cpu {(prof.cpu - load_cpu) / floor['cpu']:.2f} x)", in_cold - load <= 1.2 * floor["seconds"]))
    if large:
        large_floor, large_floor_cpu = per_image * args.large_images, per_image_cpu * args.large_images
        targets.append((f"cold build of {args.large_images} images as a new process <= 1.4 x its floor ({large['seconds']:.2f} s "
                        f"vs limit {1.4 * large_floor:.2f} s; {large['seconds'] / large_floor:.2f} x, "
                        f"cpu {large['cpu'] / large_floor_cpu:.2f} x)", large["seconds"] <= 1.4 * large_floor))
        targets.append((f"peak memory of the {args.large_images}-image build <= 1.2 x N/8 ({mib(large['maxrss'])} vs limit "
                        f"{mib(1.2 * small['maxrss'])}; {large['maxrss'] / small['maxrss']:.2f} x)",
                        large["maxrss"] <= 1.2 * small["maxrss"]))
    if rollout:
        (bare, bare_cpu), (roll, roll_cpu) = rollout["bare"], rollout["rollout"]
        targets.append((f"rollout at {args.rollout_size} px ({rollout['tokens']} tokens, {rollout['model']}, {rollout['images']} images) "
                        f"<= 0.2 x the forward ({roll:.2f} s vs limit {0.2 * bare:.2f} s; {roll / bare:.2f} x, "
                        f"cpu {roll_cpu / bare_cpu:.2f} x)", roll <= 0.2 * bare))
    if big:
        # Keeping O(1) layers costs a small fraction of keeping all L; half is a generous line that
        # holding every layer (or views into every layer's matrix) cannot pass.
        targets.append((f"{BIG_MODEL} {args.big_size}px: build peak above baseline <= half of holding every layer's "
                        f"per-head matrices for the batch ({mib(big['over'])} vs {mib(big['hold_all_batch'])}; "
                        f"{100 * big['over'] / big['hold_all_batch']:.0f}%)",
                        big["over"] <= 0.5 * big["hold_all_batch"]))
    if args.methods_images:
        import methods as method_bench

        print(f"\n[7] map methods through the Python API against their floors ({args.methods_images} images, "
              f"batch {args.batch_size}, best of 2)")
        paths = [Path(i["file"]) for i in images[: args.methods_images]]
        measured = method_bench.measure(args.model, paths, args.batch_size, repeats=2)
        method_bench.report(measured)
        targets.extend(method_bench.speed_goals(measured))
    if evaluated:
        from evaluate import report as report_evaluate

        print("(8) --evaluate")
        targets.extend(report_evaluate(evaluated))
    print("\nTARGETS")
    for text, ok in targets:
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
