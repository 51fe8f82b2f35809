"""`python -m unlearn_core generate|surrogate|unlearn|evaluate|probe`.

Each verb is `parse_args(argv)` + `main(args)`, so tests call `main(parse_args([...]))`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import fields
from pathlib import Path

from tqdm.auto import tqdm

from unlearn_core import settings
from unlearn_core.config import DEMO_MODEL, PRESETS, GenerationRequest, InstanceTarget, UnlearnConfig, max_training_steps, parse_seeds
from unlearn_core.errors import InvalidInput
from unlearn_core.settings import DTYPES


def _add_model(parser):
    parser.add_argument("--model", default=DEMO_MODEL, help="hub id or local diffusers folder (default: the embedded demo model)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="weights' precision (default auto: half precision on a GPU, fp32 elsewhere and for the demo model)")
    parser.add_argument("--no-t5", action="store_true", default=None, help="SD3: load without the T5 text encoder")


def _add_sampling(parser):
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")


def _load(args):
    from unlearn_core.models import load_model

    return load_model(args.model, args.device)


# -- generate ----------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from unlearn_core.generate import generate_grid, write_grid

    request = GenerationRequest(args.prompt, parse_seeds(args.seeds), args.steps, args.guidance)
    model = _load(args)
    with tqdm(total=len(request.seeds), desc="generate", unit="img") as bar:
        results = generate_grid(model, request, progress=lambda done, total: bar.update(done - bar.n))
    manifest = write_grid(results, Path(args.out))
    print(f"wrote {len(results)} images and {manifest}")
    return 0


# -- surrogate ---------------------------------------------------------------------------------
def cmd_surrogate(args) -> int:
    from unlearn_core.files import save_image_atomic
    from unlearn_core.images import load_for_model
    from unlearn_core.surrogate import SurrogateOptions, make_surrogate

    options = SurrogateOptions(args.method, prompt=args.prompt, strength=args.strength, sigma=args.sigma, seed=args.seed, steps=args.steps, guidance=args.guidance)
    if args.size is not None and not 8 <= args.size <= 4096:
        raise InvalidInput(f"--size must be between 8 and 4096 pixels; got {args.size}")
    model = _load(args) if args.method == "sdedit" or args.size is None else None
    size = model.image_size if model else (args.size, args.size)
    target = load_for_model(args.image, size, "target image")
    with tqdm(total=1, desc=f"surrogate ({args.method})") as bar:
        result = make_surrogate(model, target, options)
        bar.update(1)
    save_image_atomic(result, args.out)
    print(f"wrote {args.out}")
    return 0


# -- unlearn -----------------------------------------------------------------------------------
# Config fields whose option would clash with an instance option of the same verb.
RENAMED_OPTIONS = {"seed": "train_seed"}


def config_from_args(args) -> UnlearnConfig:
    given = {spec.name: getattr(args, RENAMED_OPTIONS.get(spec.name, spec.name), None) for spec in fields(UnlearnConfig)}
    return UnlearnConfig.from_preset(args.preset, **{name: value for name, value in given.items() if value is not None})


def _add_config_options(parser):
    """One option per `UnlearnConfig` field, with its help text (None = preset/default)."""
    for spec in fields(UnlearnConfig):
        option = "--" + RENAMED_OPTIONS.get(spec.name, spec.name).replace("_", "-")
        help_text = spec.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if spec.name in ("remember_prompts", "eval_prompts"):
            parser.add_argument(option, action="append", default=None, help=help_text + " (repeatable)")
        elif spec.type in ("bool", bool):
            parser.add_argument(option, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(spec.type), str)
            choices = spec.metadata.get("choices")
            parser.add_argument(option, type=kind, choices=choices, default=None, help=help_text)


def cmd_unlearn(args) -> int:
    from unlearn_core.distributed import is_main_process, wait_for_everyone
    from unlearn_core.run import RunCallbacks
    from unlearn_core.runfolder import RunFolder
    from unlearn_core.trainer import TrainingCancelled, TrainingDiverged
    from unlearn_core.job_process import execute

    config = config_from_args(args)
    if not args.surrogate:
        raise InvalidInput("--surrogate is required (an image file)")
    if not (len(args.surrogate) == len(args.seed) == len(args.prompt)) or (args.target and len(args.target) != len(args.seed)):
        raise InvalidInput("give one --prompt, --seed and --surrogate (and --target if any) per instance")
    targets = [InstanceTarget(p, s, sur, (args.target or [None] * len(args.seed))[i]) for i, (p, s, sur) in enumerate(zip(args.prompt, args.seed, args.surrogate))]
    folder = RunFolder(args.out).create()
    if is_main_process():  # under torchrun every process runs this verb; one writes the request,
        folder.write_request(args.model, config.to_dict(), [vars(target) for target in targets])
    wait_for_everyone()  # and the others read it once it is there
    bar = tqdm(total=max_training_steps(config), desc="unlearn", unit="step")  # up to; training stops early once fixed

    def on_step(report):
        bar.n = report.step
        bar.set_postfix(L_f=f"{report.loss_forget:.4f}", L_r=f"{report.loss_remember:.4f}", cos=f"{report.cosine:+.2f}")
        bar.refresh()

    try:
        def on_images(done, total):
            bar.set_description(f"remember set: {done}/{total} images")

        result = execute(folder, args.device, RunCallbacks(on_step=on_step, on_phase=bar.set_description, on_images=on_images))
    except TrainingCancelled as error:
        print(f"cancelled: {error} (resume continues from the checkpoint in {args.out})", file=sys.stderr)
        return 3
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    print(json.dumps(result["summary"], indent=2))
    if result["metrics"]:
        print(verdict_line(result["metrics"]["forgetting"]))
    print(f"adapter and report in {args.out}")
    if args.push_to_hub:
        from unlearn_core.export import push_to_hub

        print(f"pushed to {push_to_hub(folder, args.push_to_hub, include_images=args.push_images)}")
    return 0


def verdict_line(forgetting: dict) -> str:
    """One line for the operator: the verdict and the number behind it."""
    r = forgetting["toward_surrogate"]
    if r is None:
        return "verdict: the surrogate equals the target (nothing was painted), so there is nothing to measure"
    line = f"verdict: {forgetting['verdict']} — the painted pixels moved {r:.0%} of the way to the surrogate (fixed at ≥ {forgetting['fixed_at']:.0%})"
    if forgetting.get("rest_changed"):
        line += f"; but the pixels you did not paint changed too (mean {forgetting['unpainted_change']:.0%}): look at the before/after grid"
    return line


# -- evaluate ----------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from unlearn_core.evaluation import EvalTarget, evaluate
    from unlearn_core.files import save_image_atomic
    from unlearn_core.images import load_for_model
    from unlearn_core.runfolder import RunFolder

    config = UnlearnConfig(eval_seeds=args.eval_seeds, eval_prompts=args.eval_prompt or [], remember_seed_offset=args.remember_seed_offset,
                           remember_count=args.remember_count, generation_steps=args.steps, guidance_scale=args.guidance)
    model = _load(args)
    adapter = RunFolder(args.adapter)
    with tqdm(total=3, desc="evaluate") as bar:
        base_target = model.generate(args.prompt, [args.seed], args.steps, args.guidance)[0][0]
        model.load_lora(adapter.path)
        bar.update(1)
        target = load_for_model(args.target, model.image_size, "target") if args.target else base_target
        surrogate_file = adapter.training_image("surrogate", 0)
        surrogate = load_for_model(surrogate_file, model.image_size, "surrogate") if surrogate_file.is_file() else target
        report, picture, after_images = evaluate(model, [EvalTarget(args.prompt, args.seed, target, surrogate)], config)
        bar.update(2)
    out = RunFolder(args.out).create()
    out.write_metrics(report)
    save_image_atomic(picture, out.picture)
    save_image_atomic(after_images[0], out.after_image(0))
    print(json.dumps({"target": report["targets"][0]["after_vs_target"], "integrity_ssim": {k: v["ssim"]["value"] for k, v in report["integrity"].items()}}, indent=2, default=str))
    print(verdict_line(report["forgetting"]))
    print(f"wrote {out.metrics_file} and {out.picture}")
    return 0


# -- probe -------------------------------------------------------------------------------------
def cmd_probe(args) -> int:
    from unlearn_core.probe import DEFAULT_VARIANTS, ProbeConfig, run_probe, summary_lines

    variants = ([] if args.no_default_variants else list(DEFAULT_VARIANTS)) + list(args.variant or [])
    config = ProbeConfig(concept=args.concept, variants=variants, seeds=args.seeds, steps=args.steps, guidance=args.guidance,
                         heatmap_resolution=args.heatmap_resolution, clip_model=args.clip_model)
    model = _load(args)
    with tqdm(total=1, desc="probe", unit="step") as bar:

        def progress(done, total):
            bar.total = total
            bar.update(done - bar.n)

        result = run_probe(model, config, out_dir=args.out, progress=progress)
    print("\n".join(summary_lines(result)))
    return 0


# -- release -----------------------------------------------------------------------------------
def cmd_release(args) -> int:
    from unlearn_core.ledger import Ledger
    from unlearn_core.release import make_release, summary_lines

    run_dirs = list(args.run_dirs) + ([fix.run_dir for fix in Ledger(settings.current().runs_dir).list()] if args.ledger else [])
    summary = make_release(run_dirs, args.out, args.device)
    print("\n".join(summary_lines(summary)))
    print(f"wrote the release adapter, its card and release.json in {args.out}")
    return 0 if not summary["not_holding"] else 1


def cmd_ledger(args) -> int:
    from unlearn_core.ledger import Ledger, as_json, table_lines

    ledger = Ledger(settings.current().runs_dir)
    if args.action == "add":
        shown = [ledger.add(path, owner="cli") for path in args.items]
    elif args.action == "retire":
        shown = [ledger.retire(fix_id) for fix_id in args.items]
    else:
        shown = ledger.list(include_retired=args.all)
    print(as_json(shown) if args.json else "\n".join(table_lines(shown)))
    return 0


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m unlearn_core", description="Hotfix Studio: prompt-free instance unlearning for diffusion models.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="{generate,surrogate,unlearn,evaluate,probe,release,ledger}")

    gen = sub.add_parser("generate", help="a seed grid with provenance (PNGs + manifest.json)")
    _add_model(gen)
    gen.add_argument("--prompt", default="", help="text prompt (ignored by unconditional models)")
    gen.add_argument("--seeds", default="0-7", help="'0-7', '1,5,9' or '3'")
    _add_sampling(gen)
    gen.add_argument("--out", required=True)
    gen.set_defaults(func=cmd_generate)

    sur = sub.add_parser("surrogate", help="make a surrogate image from a target")
    _add_model(sur)
    sur.add_argument("--method", choices=("sdedit", "flip", "noise"), required=True)
    sur.add_argument("--image", required=True, help="the target image")
    sur.add_argument("--out", required=True)
    sur.add_argument("--prompt", default="", help="SDEdit: edit prompt")
    sur.add_argument("--strength", type=float, default=0.6, help="SDEdit strength in (0, 1]")
    sur.add_argument("--sigma", type=float, default=0.2, help="noise: std in [0, 1] pixel units")
    sur.add_argument("--seed", type=int, default=0)
    _add_sampling(sur)
    sur.add_argument("--size", type=int, default=None, help="flip/noise without loading a model: output size")
    sur.set_defaults(func=cmd_surrogate)

    unl = sub.add_parser("unlearn", help="fine-tune a LoRA that removes the target output")
    _add_model(unl)
    unl.add_argument("--prompt", action="append", required=True, help="the target's prompt (repeat for several targets)")
    unl.add_argument("--seed", type=int, action="append", required=True, help="the target's seed")
    unl.add_argument("--surrogate", action="append", required=True, help="surrogate image file")
    unl.add_argument("--target", action="append", default=None, help="target image (default: the model's output for prompt + seed)")
    unl.add_argument("--out", required=True, help="run folder")
    unl.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    unl.add_argument("--push-to-hub", metavar="REPO", default=None, help="then upload the adapter and its cards to this Hub model repo (private; token from HF_TOKEN or `hf auth login`)")
    unl.add_argument("--push-images", action="store_true", help="with --push-to-hub: also upload the target and surrogate images (left out by default)")
    _add_config_options(unl)
    unl.set_defaults(func=cmd_unlearn)

    ev = sub.add_parser("evaluate", help="before/after metrics of an adapter")
    _add_model(ev)
    ev.add_argument("--adapter", required=True, help="run folder with the adapter")
    ev.add_argument("--prompt", default="")
    ev.add_argument("--seed", type=int, required=True)
    ev.add_argument("--target", default=None, help="target image (default: the base model's output)")
    ev.add_argument("--eval-seeds", type=int, default=16)
    ev.add_argument("--eval-prompt", action="append", default=None)
    ev.add_argument("--remember-seed-offset", type=int, default=1000)
    ev.add_argument("--remember-count", type=int, default=UnlearnConfig.remember_count)
    _add_sampling(ev)
    ev.add_argument("--out", required=True)
    ev.set_defaults(func=cmd_evaluate)

    pro = sub.add_parser("probe", help="instruction-forgetting analysis: why 'forget X' in the prompt does not work")
    _add_model(pro)
    pro.add_argument("--concept", required=True, help="the concept X, e.g. 'the flag of japan'")
    pro.add_argument("--seeds", default="0-3", help="'0-3', '0,2,5' or '7'")
    pro.add_argument("--out", required=True, help="output folder (CSV, summary.json, PNGs)")
    _add_sampling(pro)
    pro.add_argument("--variant", action="append", default=None, help="extra prompt variant, 'name: template' with {concept} (repeatable)")
    pro.add_argument("--no-default-variants", action="store_true", help="use only the --variant prompts")
    pro.add_argument("--heatmap-resolution", type=int, default=16)
    pro.add_argument("--clip-model", default=None, help="CLIP id or folder for image similarity (default: the HOTFIX_CLIP_MODEL setting, else CLIP ViT-B/32)")
    pro.set_defaults(func=cmd_probe)

    rel = sub.add_parser("release", help="one adapter carrying several fixes (finished run folders), every fix re-checked in it")
    rel.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="run folders of finished jobs on the same base model")
    rel.add_argument("--ledger", action="store_true", help="also every fix of the ledger in HOTFIX_RUNS_DIR that is not retired")
    rel.add_argument("--out", required=True, help="folder for the release: adapter files, model card, release.json")
    rel.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    rel.set_defaults(func=cmd_release)

    led = sub.add_parser("ledger", help="the fix ledger in HOTFIX_RUNS_DIR: list, add a fixed run, retire a fix")
    led.add_argument("action", choices=("list", "add", "retire"))
    led.add_argument("items", nargs="*", metavar="RUN_DIR|FIX_ID", help="add: run folders of fixed jobs; retire: fix ids (from list)")
    led.add_argument("--all", action="store_true", help="list: retired fixes too")
    led.add_argument("--json", action="store_true", help="print JSON")
    led.set_defaults(func=cmd_ledger)
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(args) -> int:
    from unlearn_core.errors import OperatorError

    loading = {name: value for name, value in (("dtype", getattr(args, "dtype", None)), ("without_t5", getattr(args, "no_t5", None))) if value is not None}
    settings.use(dataclasses.replace(settings.current(), **loading))  # the job process of `unlearn` loads with them too
    try:
        return args.func(args)
    except OperatorError as error:  # anything else is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


def entry(argv=None) -> int:
    return main(parse_args(argv))
