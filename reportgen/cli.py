"""Command line: parses options, applies them over the manifest, calls :func:`reportgen.builder.build`.

Exit status: 0 every image done; 1 an error stopped the build (printed as one plain message, the
previous site intact); 2 a usage error (an unknown option or a value the settings reject); 3 the
site was written but some images failed (their cards say why).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path

import click

from reportgen import __version__
from reportgen.errors import OutputBusyError, ReportgenError

EXIT_ERROR = 1
# 2 is click's code for usage errors (a bad option or setting)
EXIT_IMAGES_FAILED = 3


# Each option that overrides a manifest setting, and the (section, field) it sets (None: the
# whole top-level key, such as methods).
_SETTING_OPTIONS = {
    "model": ("model", "name"),
    "weights": ("model", "weights"),
    "input_size": ("model", "input_size"),
    "random_weights": ("model", "pretrained"),
    "head_fusion": ("attention", "head_fusion"),
    "discard_ratio": ("attention", "discard_ratio"),
    "rollout_start_layer": ("attention", "rollout_start_layer"),
    "target_classes": ("attention", "target_classes"),
    "object_targets": ("attention", "object_targets"),
    "detector": ("detector", "name"),
    "detector_threshold": ("detector", "threshold"),
    "cmap": ("output", "cmap"),
    "alpha": ("output", "alpha"),
    "scale": ("output", "scale"),
    "scale_percentile": ("output", "scale_percentile"),
    "title": ("output", "title"),
    "evaluate": ("evaluate", "enabled"),
    "evaluate_baseline": ("evaluate", "baseline"),
    "random_orders": ("evaluate", "random_orders"),
    "sanity": ("evaluate", "sanity"),
    "sanity_image": ("evaluate", "sanity"),  # after --sanity: a problem with the ids names this option
    "methods": ("methods", None),
}


def _overrides(**options) -> dict:
    """Manifest overrides from options the user actually gave (None = not given). Options are
    only parsed here; their values are checked by the settings' own models."""
    sections: dict = {"model": {}, "attention": {}, "detector": {}, "output": {}, "evaluate": {}, "methods": None}
    for option, value in options.items():
        if value is None or value == ():  # () : a repeatable option not given
            continue
        section, key = _SETTING_OPTIONS[option]
        if option == "random_weights":
            value = not value
        if option == "weights":
            value = Path(value).resolve()
        if option == "sanity_image":
            if options.get("sanity"):
                raise click.UsageError("give --sanity (every image) or --sanity-image (the images named), not both")
            value = list(value)
        if option == "target_classes":
            value = value[0] if len(value) == 1 else list(value)
        if option == "methods":
            value = value.strip() if value.strip() == "all" else [name.strip() for name in value.split(",")]
        if key is None:
            sections[section] = value
        else:
            sections[section][key] = value
    return sections


def _usage_error(err: ValueError) -> click.UsageError:
    """A settings error as a usage error naming the option (``--input-size``) it came from."""
    from reportgen.config import SettingsError

    if not isinstance(err, SettingsError):
        return click.UsageError(str(err))
    options = {target: option for option, target in _SETTING_OPTIONS.items()}
    key, message = err.problems[0]
    if err.section in ("options", "export"):  # BuildOptions, ExportOptions: each field is the option of the same name
        option = key.split(".", 1)[0]
    else:
        option = options.get((err.section, None)) or options.get((err.section, key.split(".", 1)[0]))
    if not option:
        return click.UsageError(str(err))
    return click.BadParameter(message, param_hint=f"'--{option.replace('_', '-')}'")


@click.group()
@click.version_option(__version__, prog_name="reportgen")
def main() -> None:
    """reportgen: static HTML reports of how Vision Transformers attend to images."""


@main.command()
@click.argument("manifest", type=click.Path(path_type=Path))  # load_manifest says what is wrong with it
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Site folder to write (default: the manifest's output.dir, else ./site).")
@click.option("--model", default=None, help="timm ViT name, imgfocus-vits14 for the offline model, hf:ORG/NAME for a transformers "
              "model on the Hugging Face hub, or the path of a folder written by save_pretrained.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="Local weights file (safetensors or torch state dict) for --model's architecture.")
@click.option("--input-size", type=int, default=None, help="Square input size in pixels.")
@click.option("--random-weights", is_flag=True, default=None,
              help="Random initialisation instead of pretrained weights (for testing and timing).")
@click.option("--head-fusion", default=None, help="Rollout head fusion: mean, max or min.")
@click.option("--discard-ratio", type=float, default=None,
              help="Rollout: drop this fraction of lowest attentions per layer (vit-explain style).")
@click.option("--rollout-start-layer", type=int, default=None,
              help="Rollout: first layer multiplied (1 = all layers; earlier layers count as the identity).")
@click.option("--target-classes", "--target-class", "target_classes", multiple=True,
              help="Gradient methods: a class to explain, by index or name (repeat the option for several), "
                   "or top-k for each image's k best classes (default: each image's top-1 class).")
@click.option("--object-targets", is_flag=True, default=None,
              help="Gradient methods: also explain each object of an image (its embedding's cosine "
                   "similarity with the image's); one more backward pass per object.")
@click.option("--detector", default=None,
              help="DETR model name or folder for images without boxes; 'none' uses manifest boxes only.")
@click.option("--detector-threshold", type=float, default=None,
              help="Minimum detector score.")
@click.option("--cmap", default=None, help="Matplotlib colour map for overlays (e.g. cividis for colour-blind readers).")
@click.option("--alpha", type=float, default=None, help="Overlay opacity, 0 < alpha <= 1.")
@click.option("--scale", default=None,
              help="Colour scale of the maps: map (each to its own maximum), shared (one maximum per "
                   "figure family of an image) or percentile (each clipped at its --scale-percentile).")
@click.option("--scale-percentile", type=float, default=None,
              help="With --scale percentile: the percentile each map is clipped at, 50 < p <= 100 (default 99).")
@click.option("--title", default=None, help="Site title.")
@click.option("--methods", default=None,
              help="Map methods to run, comma-separated (e.g. attention,rollout), or all.")
@click.option("--evaluate", is_flag=True, default=None,
              help="Evaluate every map against the model: perturbation curves (extra forward passes), "
                   "localisation in the boxes, agreement between the maps.")
@click.option("--evaluate-baseline", default=None,
              help="With --evaluate: what replaces a removed patch, mean (the image's mean colour, default), blur or zero (black).")
@click.option("--random-orders", type=int, default=None,
              help="With --evaluate: seeded random orders the random baseline averages over (default 5).")
@click.option("--sanity", is_flag=True, default=None,
              help="With --evaluate: re-initialise the model's blocks from the top down and report how much each "
                   "map changes (one more pass of every image per block).")
@click.option("--sanity-image", "sanity_image", multiple=True, metavar="ID",
              help="With --evaluate: run the sanity check on the image with this id only (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Images per forward pass.")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Figure writers: 1 is a thread, 2 or more are processes; either way figures are "
                   "written while the model runs the next batch.")
@click.option("--strict", is_flag=True, help="Stop at the first image that fails.")
@click.option("--force", is_flag=True, help="Ignore the previous build's cache: recompute every image.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--no-wait", is_flag=True,
              help="If another build is writing the same output folder, fail at once (exit 1) instead of "
                   "waiting for it to finish.")
@click.option("--watch", is_flag=True,
              help="After building, rebuild whenever the manifest, an image or a template changes "
                   "(the model stays loaded); Ctrl-C stops.")
def build(manifest: Path, output: Path | None, device: str, batch_size: int, jobs: int, strict: bool, force: bool,
          quiet: bool, no_wait: bool, watch: bool, **settings) -> None:
    """Build the site for MANIFEST (a YAML file listing images)."""
    from reportgen.config import SettingsError, build_options, check_overrides

    try:
        check_overrides(**_overrides(**settings))  # before the manifest is read, let alone a model
        options = build_options(device=device, batch_size=batch_size, strict=strict, force=force, jobs=jobs,
                               model_cache={} if watch else None, wait=not no_wait,
                               on_wait=lambda message: click.echo(f"reportgen: {message}", err=True))
    except SettingsError as err:
        raise _usage_error(err) from None
    # SIGTERM (kill, CI cancel, timeout) unwinds like Ctrl-C, so the staging folder is removed;
    # the previous handler is put back afterwards (the command may run inside another program).
    in_main_thread = threading.current_thread() is threading.main_thread()  # signals need it
    previous_handler = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        if watch:
            _watch(manifest, output, options, settings, quiet)  # until Ctrl-C
        status, _manifest = _build_once(manifest, output, options, settings, quiet, watching=False)
    except KeyboardInterrupt:
        if watch:
            click.echo("reportgen: stopped watching.", err=True)  # a build cut short left the site as it was
            sys.exit(0)
        click.echo("reportgen: interrupted; the previous site (if any) is unchanged.", err=True)
        sys.exit(130)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    sys.exit(status)


@main.command()
@click.argument("source", metavar="SITE_OR_MANIFEST", type=click.Path(path_type=Path))
@click.option("--image", required=True, help="The id of the image to export (as in the manifest and results.json).")
@click.option("--format", "format_", default="svg", show_default=True, help="svg, pdf or png.")
@click.option("--dpi", type=int, default=300, show_default=True,
              help="Dots per inch: a PNG's pixels per inch; in PDF and SVG, the resolution of the colour bars' "
                   "gradients (the images are embedded at their own pixels).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="The file to write (default: the image's id as a file name, with the format's suffix).")
@click.option("--device", default="auto", show_default=True, help="From a manifest: where the model runs.")
def export(source: Path, image: str, format_: str, dpi: int, output: Path | None, device: str) -> None:
    """Write one image's panels as a print-ready figure: the model input and every map with a
    labelled colour bar, the method and the target in the caption.

    SITE_OR_MANIFEST is a built site (its folder or its results.json: the figure is drawn from the
    numbers the pages show, no model runs) or a manifest (the model runs on that one image).
    """
    from reportgen.config import SettingsError, export_options
    from reportgen.export import export as run_export

    try:
        options = export_options(image=image, format=format_, dpi=dpi, output=output, device=device)
    except SettingsError as err:
        raise _usage_error(err) from None
    try:
        written = run_export(source, options)
    except ReportgenError as err:
        click.echo(f"reportgen: {err}", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(f"Wrote {written}", err=True)


def _build_once(manifest_path: Path, output: Path | None, options, settings: dict, quiet: bool,
                watching: bool) -> tuple[int, object]:
    """Load the manifest, build, print what happened. Returns the exit status and the manifest
    built (``None`` if it could not be loaded); a known error is printed, and with ``watching``
    does not end the program."""
    from reportgen.builder import build as run_build
    from reportgen.config import load_manifest
    from reportgen.config.options import DEFAULT_OUTPUT

    loaded = None
    try:
        loaded = load_manifest(manifest_path)
        try:
            loaded = loaded.with_overrides(**_overrides(**settings))
        except ValueError as err:
            raise _usage_error(err) from None
        out = output or loaded.output.dir or DEFAULT_OUTPUT
        report = _run_with_progress(run_build, loaded, dataclasses.replace(options, output=Path(out)), quiet)
    except ReportgenError as err:
        click.echo(f"reportgen: {err}", err=True)
        if watching and isinstance(err, OutputBusyError):
            click.echo("reportgen: not built; watching for changes (the next one tries again).", err=True)
        elif watching:
            click.echo("reportgen: fix it and save; watching for changes.", err=True)
        return EXIT_ERROR, loaded
    for warning in report.warnings:
        click.echo(f"reportgen: warning: {warning}", err=True)
    for image_id, message in report.failed:
        click.echo(f"reportgen: image {image_id!r} failed: {message}", err=True)
    if not quiet:
        ok = report.images - len(report.failed)
        reused = f", {report.reused} unchanged" if report.reused else ""
        load = f", model loaded in {report.model_load_seconds:.1f} s" if report.model_load_seconds is not None else ""
        click.echo(f"Wrote {report.output / 'index.html'} ({ok} of {report.images} images{reused}{load}, "
                   f"{report.seconds:.1f} s in total)", err=True)
    return (EXIT_IMAGES_FAILED if report.failed else 0), loaded


def _watch(manifest_path: Path, output: Path | None, options, settings: dict, quiet: bool) -> None:
    """Build, then rebuild whenever an input changes, until interrupted. The model is loaded
    while waiting (once per model), so that the first image edited is as quick as the next."""
    from reportgen.config import load_manifest
    from reportgen.errors import ManifestError
    from reportgen.watch import snapshot, wait_for_change, watched_paths

    tried: set[str] = set()
    while True:
        try:
            current = load_manifest(manifest_path)
        except ManifestError:
            current = None  # the build reports it; watch the manifest until it is fixed
        paths = watched_paths(manifest_path, current)
        before = snapshot(paths)  # before the build reads them: a file saved meanwhile counts
        _status, built = _build_once(manifest_path, output, options, settings, quiet, watching=True)
        options = dataclasses.replace(options, force=False)  # --force is for the first build only
        if built is not None and repr(built.model) not in tried:
            tried.add(repr(built.model))
            _keep_model(built, options, quiet)
        if not quiet:
            click.echo(f"reportgen: watching {manifest_path}, its images and the templates (Ctrl-C stops).", err=True)
        changed = wait_for_change(paths, before)
        if not quiet:
            names = ", ".join(p.name for p in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            click.echo(f"reportgen: changed: {names}; rebuilding.", err=True)


def _keep_model(manifest, options, quiet: bool) -> None:
    from reportgen.compute import prepare_for_rebuilds

    try:
        seconds = prepare_for_rebuilds(manifest, options.device, options.model_cache)
    except ReportgenError as err:
        click.echo(f"reportgen: warning: {err}", err=True)
        return
    if seconds is not None and not quiet:
        click.echo(f"reportgen: model loaded in {seconds:.1f} s, kept for rebuilds.", err=True)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _run_with_progress(run_build, manifest, options, quiet: bool):
    total = len(manifest.images)
    show = not quiet and sys.stderr.isatty()
    if not show:
        return run_build(manifest, options)
    started = time.perf_counter()
    done = 0
    lock = threading.Lock()  # images finish in the figure writer's thread and in this one

    def rate(_item) -> str:
        elapsed = time.perf_counter() - started
        return f"{done / elapsed:.2f} img/s" if done and elapsed > 0 else ""

    with click.progressbar(length=total, label="Images", file=sys.stderr, show_pos=True, item_show_func=rate) as bar:

        def advance(count: int) -> None:
            nonlocal done
            with lock:
                done += count
                bar.update(count, current_item=done)

        return run_build(manifest, options, progress=advance)


if __name__ == "__main__":
    main()
