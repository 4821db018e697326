"""``nspo-trl projector``: build a projector from a recipe without training, or push one to the Hub.

    nspo-trl projector build smollm2_cpu --output projectors/smollm2
    nspo-trl projector push projectors/smollm2 me/smollm2-nspo-projector
    # then, in any recipe for the same model and rule:  nspo_projector_from: me/smollm2-nspo-projector

``build`` loads the recipe's model the way training does, collects the preservation covariances with the
same memory-bounded build (:class:`~nspo_trl.nullspace.build.ProjectorBuilder`) and saves the projector with
the same record (the protected weights' fingerprint, the data's digest, the rule), so a run given it through
``nspo_projector_from`` (or ``nspo_projector_path``) uses it after checking that record, never silently.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from huggingface_hub import HfApi


def hub_api() -> HfApi:
    """The Hub client ``push`` uploads through (``HF_TOKEN`` or the stored login)."""
    return HfApi()


def build(argv: list[str], prog: str) -> int:
    """``build RECIPE [--output DIR] [recipe overrides]``: the recipe's projector, saved to DIR."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nspo_trl.cli.arguments import parse
    from nspo_trl.cli.train import fail, load_recipe_data, model_init_kwargs
    from nspo_trl.nullspace.build import ProjectorBuilder
    from nspo_trl.nullspace.targets import resolve_protected_layers, untie_output_embeddings
    from nspo_trl.utils import check_versions, quiet_command_line

    parser = argparse.ArgumentParser(prog=f"{prog} build", add_help=False)
    parser.add_argument("--output", required=False)
    known, rest = parser.parse_known_args(argv)
    if any(a in ("-h", "--help") for a in argv) or not rest or rest[0].startswith("-"):
        print(f"usage: {prog} build RECIPE --output DIR [recipe overrides, e.g. --nspo_alpha 1e-4]")
        return 0 if any(a in ("-h", "--help") for a in argv) else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_command_line()
    try:
        if not known.output:
            raise ValueError("--output: required (a new folder for the projector).")
        output = Path(known.output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise ValueError(f"--output: {output} exists and is not an empty folder; choose a new one.")
        check_versions(("trl", "transformers"))
        script_args, training_args, model_args = parse(rest, prog=f"{prog} build")
        if training_args.nspo_projector_from:
            raise ValueError("nspo_projector_from: the recipe already names a projector; there is nothing to build.")
        train_dataset, model_path, preservation = load_recipe_data(script_args, training_args, model_args)
        model = AutoModelForCausalLM.from_pretrained(model_path, **model_init_kwargs(training_args, model_args))
        if training_args.nspo_untie_word_embeddings:
            untie_output_embeddings(model)
        tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision)
        layers = resolve_protected_layers(model.eval(), training_args.nspo_target_modules)
        projector = ProjectorBuilder(model, tokenizer, layers, training_args).build(preservation, train_dataset)
        projector.save(output)
    except ValueError as err:
        fail(f"error: {err}")
        return 2
    print(f"projector: {projector.describe()}")
    print(f"saved to {output}; train with nspo_projector_from: {output}, or share it with")
    print(f"  {prog} push {output} OWNER/NAME")
    return 0


def push(argv: list[str], prog: str) -> int:
    """``push DIR REPO [--private]``: upload a saved projector (checked first) to the Hub repo REPO."""
    from nspo_trl.trainer.hub import push_projector

    parser = argparse.ArgumentParser(prog=f"{prog} push", description="Upload a saved projector to the Hub.")
    parser.add_argument("directory", help="a folder written by 'projector build' (or a run's nspo_projector/)")
    parser.add_argument("repo", help="the Hub repo id, owner/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    args = parser.parse_args(argv)
    try:
        url = push_projector(args.directory, args.repo, hub_api(), private=args.private or None)
    except ValueError as err:
        print(f"{prog} push: error: {err}", file=sys.stderr)
        return 2
    print(f"pushed {args.directory} to {args.repo} ({url}); use it with nspo_projector_from: {args.repo}")
    return 0


ACTIONS = {"build": build, "push": push}


def main(argv: list[str], prog: str = "nspo-trl projector") -> int:
    if not argv or argv[0] not in ACTIONS:
        print(f"usage: {prog} {{build,push}} ...\n  build RECIPE --output DIR\n  push DIR REPO", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    return ACTIONS[argv[0]](argv[1:], prog)
