"""The model card of an ``NSPOTrainer`` run and what ``push_to_hub`` uploads.

The card is TRL's model card (its tags, quick start, framework versions and citations) rendered from this
package's template (``templates/nspo_model_card.md``) with huggingface_hub's ``ModelCard.from_template``, plus
the NSPO section (:func:`nspo_card_section`). ``push_to_hub`` uploads ``output_dir`` with huggingface_hub's
``upload_folder``, leaving out checkpoints, private state and local folders (:meth:`HubMixin.hub_ignore_patterns`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib.metadata import version
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData
from transformers import is_wandb_available
from trl.trainer.utils import get_comet_experiment_url, get_config_model_id, get_trackio_space_url

from nspo_trl.nullspace.projector import NullSpaceProjector
from nspo_trl.trainer.nspo_config import NSPOConfig

TEMPLATE = Path(__file__).resolve().parent / "templates" / "nspo_model_card.md"
EVAL_REPORT = "eval/report.md"  # written by nspo-trl eval --output_dir <output_dir>/eval; quoted in the card
PROJECTOR_FILES = ["projector.json", "factors-rank*.safetensors"]  # what a saved projector consists of
TRAINER_IGNORE_PATTERNS = ("_*", "checkpoint-*")  # what Trainer.push_to_hub leaves out: private state, checkpoints

NSPO_CITATION = """\
@inproceedings{niu2026nspo,
    title        = {{Mitigating the Safety Alignment Tax with Null-Space Constrained Policy Optimization}},
    author       = {Yifan Niu and Han Xiao and Dongyi Liu and Nuo Chen and Jia Li},
    year         = 2026,
    booktitle    = {The Fourteenth International Conference on Learning Representations, {ICLR} 2026},
    eprint       = {arXiv:2512.11391}
}"""


def nspo_card_section(
    args: NSPOConfig,
    projector: NullSpaceProjector,
    num_protected: int,
    leakage: Mapping[str, Mapping[str, float]],
    details: Mapping[str, str] | None = None,
    projector_bytes: int | None = None,
    eval_report: str | None = None,
) -> str:
    """Markdown: what the run was (``details``: base model, data, reward and judge, as the trainer or
    ``nspo-trl train`` knows them), the NSPO settings, the null dimensions, the leakage per split (max over
    layers of ``‖X (W − W_ref)ᵀ‖ / ‖X W_refᵀ‖``, from ``leakage``: split → layer → value), where the
    projector is (``projector_bytes`` on disk; uploaded only with ``nspo_push_projector``), the projector
    per input group, and ``eval_report`` (an ``nspo-trl eval`` report) when there is one."""
    meta = projector.metadata
    summary = projector.summary()
    worst = {split: max(values.values()) for split, values in leakage.items() if values}
    lines = [
        "## NSPO",
        "",
        "Trained with [NSPO](https://huggingface.co/papers/2512.11391): after every "
        f"{args.nspo_project_every} optimizer step(s), each protected weight is set to "
        "`W_ref + (W − W_ref) P`, where `P` projects onto the null space of the layer's inputs on "
        "general-task (preservation) data, so outputs on such inputs stay unchanged.",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    lines += [f"| {what} | {value} |" for what, value in (details or {}).items()]
    rule = (
        "by contrast with the harmful training prompts"
        + (" (benign training prompts protected too)" if args.nspo_contrast_protect_benign else "")
        + f", held-out preservation energy ≤ {args.nspo_contrast_budget:g} per group"
        if args.nspo_subspace == "contrast"
        else f"λ ≤ {args.nspo_alpha:g}·λmax, energy {args.nspo_energy}, max null rank {args.nspo_max_null_rank}"
    )
    lines += [
        f"| preservation examples | {meta.get('fit_examples')} fit, {meta.get('heldout_examples')} held out, "
        f"{meta.get('fit_tokens')} tokens |",
        f"| protected modules | `{', '.join(args.nspo_target_modules)}` ({num_protected} linears) |",
        f"| null space rule | {rule} |",
        f"| null dimensions | {summary['null_dim_total']} of {summary['in_features_total']} input dimensions "
        f"({100 * summary['null_fraction']:.1f}%) |",
        f"| gradient projection | {'yes' if args.nspo_project_gradients else 'no'} |",
        f"| learning rate, KL β | {args.learning_rate:g}, {args.beta:g} |",
    ]
    lines += [f"| leakage ({split}), max over layers | {value:.2e} |" for split, value in worst.items()]
    size = "" if projector_bytes is None else f" ({projector_bytes / 2**20:.1f} MiB)"
    where = (
        f"The projector (thin bases, eigenvalues, metadata){size} is in `nspo_projector/`."
        if args.nspo_push_projector
        else f"The projector{size} is not uploaded with the model (set `nspo_push_projector: true` to upload it)."
    )
    lines += [
        "",
        "Leakage is `‖X (W − W_ref)ᵀ‖ / ‖X W_refᵀ‖` on reference-model inputs `X` of the preservation data: "
        "`fit` on the examples the projector was built from, `heldout` on examples it never saw.",
        where,
        "",
        "| input group | in | null dim | stored basis | modules |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| `{group}` | {st['in_features']} | {st['null_dim']} | {st['stored']} × {st['stored_dim']} "
        f"| {len(st['modules'])} |"
        for group, st in projector.stats().items()
    ]
    if eval_report:
        lines += ["", "## Evaluation", "", eval_report.strip()]
    return "\n".join(lines)


def fetch_projector(source: str, api: HfApi) -> Path:
    """The local folder of the projector ``source`` names: a folder as given, or a Hub repo id downloaded
    (``api.snapshot_download``, cached by huggingface_hub). One-line ``ValueError`` when it is neither."""
    if Path(source).is_dir():
        return Path(source)
    if Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ValueError(
            f"nspo_projector_from: {source} is not a folder or a Hub repo id (owner/name); give the folder "
            "nspo-trl projector build wrote, or the repo nspo-trl projector push uploaded it to."
        )
    try:
        folder = Path(api.snapshot_download(repo_id=source))
    except Exception as err:
        reason = " ".join(str(err).split())[:160]
        raise ValueError(f"nspo_projector_from: cannot download {source} from the Hub ({reason}).") from None
    if not (folder / "projector.json").is_file():
        raise ValueError(f"nspo_projector_from: the Hub repo {source} holds no projector.json; push one there first.")
    return folder


def push_projector(directory: str | Path, repo_id: str, api: HfApi, private: bool | None = None) -> str:
    """Upload the projector saved in ``directory`` (checked: it loads) to the Hub repo ``repo_id``, created if
    missing; returns the commit URL."""
    directory = Path(directory)
    try:
        NullSpaceProjector.load(directory)  # every file read and checked before anything is uploaded
    except (OSError, ValueError) as err:
        raise ValueError(f"{directory}: not a projector ({' '.join(str(err).split())[:160]}).") from None
    repo = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo,
        folder_path=str(directory),
        commit_message="Upload NSPO projector",
        allow_patterns=PROJECTOR_FILES,
    )
    return str(getattr(commit, "commit_url", commit))


def is_hub_dataset(name: str | None) -> bool:
    """Whether ``name`` can be a Hub dataset id (not ``nspo_trl:<name>``, not a local file or folder)."""
    return bool(name) and ":" not in name and not Path(name).exists()


class HubMixin:
    """The model card and ``push_to_hub`` of :class:`~nspo_trl.trainer.NSPOTrainer` (module docstring)."""

    card_details: dict[str, str]

    def hub_api(self, token: str | None = None) -> HfApi:
        """The huggingface_hub client every upload goes through (``args.hub_token`` unless ``token``)."""
        return HfApi(token=token if token is not None else self.args.hub_token)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs) -> None:
        """Write ``output_dir/README.md``: TRL's card (tags ``trl``/``grpo``/``nspo``, citations) and the NSPO section.

        The base model is ``card_details["base model"]`` when set (``nspo-trl train`` sets the Hub id even when
        the model was loaded from a local conversion), else the model's Hub id; a model loaded from a local
        folder is named by that folder. ``dataset_name`` links to the Hub only when it is a Hub id.
        """
        if not self.is_world_process_zero():
            return
        local = get_config_model_id(self.accelerator.unwrap_model(self.model).config)
        base = self.card_details.get("base model") or (local if local and not os.path.isdir(local) else None)
        dataset_name = dataset_name if is_hub_dataset(dataset_name) else None
        tags = {tags} if isinstance(tags, str) else set(tags or ())
        tags.update(self._tag_names)
        data = ModelCardData(
            base_model=base,
            datasets=dataset_name,
            library_name="transformers",
            model_name=model_name,
            tags=["generated_from_trainer", *sorted(tags)],
        )
        card = ModelCard.from_template(
            data,
            template_path=str(TEMPLATE),
            base_model=base,
            local_model=Path(local).name if local else "unnamed",
            model_name=model_name or Path(self.args.output_dir).name,
            hub_model_id=self.hub_model_id or model_name or Path(self.args.output_dir).name,
            dataset_name=dataset_name,
            wandb_url=_wandb_url(),
            trackio_url=get_trackio_space_url(),
            comet_url=get_comet_experiment_url(),
            trainer_name=self._name,
            trainer_citation=self._paper["citation"],
            paper_title=self._paper["title"],
            paper_id=self._paper["id"],
            nspo_section=self.nspo_card_section(),
            **{f"{package}_version": version(package) for package in _VERSIONED},
        )
        card.save(Path(self.args.output_dir) / "README.md")

    def nspo_card_section(self) -> str:
        """The model card's NSPO section (see :func:`nspo_card_section`)."""
        if self._last_leakage is None and self.accelerator.num_processes == 1:
            self.leakage()
        output = Path(self.args.output_dir)
        projector_files = [f for f in (output / "nspo_projector").rglob("*") if f.is_file()]
        report = output / EVAL_REPORT
        return nspo_card_section(
            self.args,
            self.projector,
            len(self.protected_layers),
            self._last_leakage or {},
            details=self.card_details,
            projector_bytes=sum(f.stat().st_size for f in projector_files) if projector_files else None,
            eval_report=report.read_text() if report.is_file() else None,
        )

    def hub_ignore_patterns(self) -> list[str]:
        """What ``push_to_hub`` leaves out of ``output_dir``: what ``Trainer.push_to_hub`` does (``_*``,
        ``checkpoint-*``) and every folder except ``nspo_projector/`` (only with ``nspo_push_projector``) and
        ``eval/`` (the report in the card), so local folders such as a tiny model built inside ``output_dir``
        never reach the Hub."""
        keep = {"eval"} | ({"nspo_projector"} if self.args.nspo_push_projector else set())
        output = Path(self.args.output_dir)
        folders = sorted(p.name for p in output.iterdir() if p.is_dir()) if output.is_dir() else []
        return [*TRAINER_IGNORE_PATTERNS, *(f"{name}/*" for name in folders if name not in keep)]

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the model, write the card and upload ``output_dir`` (without :meth:`hub_ignore_patterns`) to
        ``args.hub_model_id`` (created if missing), as ``Trainer.push_to_hub`` does; ``kwargs`` go to
        :meth:`create_model_card`. Returns the commit (a future with ``blocking=False``); ``None`` off the
        main process."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None) or str(self.args.hub_model_id or self.args.output_dir)
        model_name = model_name.split("/")[-1]
        api = self.hub_api(token)
        if self.hub_model_id is None:
            repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
            private = self.args.hub_private_repo if private is None else private
            self.hub_model_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        return api.upload_folder(
            repo_id=self.hub_model_id,
            folder_path=self.args.output_dir,
            commit_message=commit_message,
            run_as_future=not blocking,
            ignore_patterns=self.hub_ignore_patterns(),
            revision=revision or self.args.hub_revision,
        )


_VERSIONED = ("nspo_trl", "trl", "transformers", "torch", "datasets", "tokenizers")


def _wandb_url() -> str | None:
    if not is_wandb_available():
        return None
    import wandb

    return wandb.run.url if wandb.run is not None else None
