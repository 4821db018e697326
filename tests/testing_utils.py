"""Helpers shared by the tests: the tiny-model trainer setup, the smoke command line and independent measures.

Tests import from here (never from another test file); fixtures live in ``conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from nspo_trl import NSPOConfig, NSPOTrainer
from nspo_trl.data.preservation import iter_batches
from nspo_trl.rewards import refusal_reward

# trainer tests run on the GPU where there is one (CI: CPU)
USE_CPU = not torch.cuda.is_available()
# torch.distributed's rendezvous variables, which launchers (and TRL's colocated vLLM start-up) put in os.environ
RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

REPO = Path(__file__).resolve().parent.parent


def smoke_args(tmp_path, *extra):
    return [
        "recipes/smoke.yaml",
        "--model_name_or_path", str(tmp_path / "tiny"),
        "--output_dir", str(tmp_path / "out"),
        "--max_steps", "6",
        "--save_steps", "3",
        "--logging_steps", "2",
        *extra,
    ]  # fmt: skip


PRESERVATION_MAX_LENGTH = 14


def capture_inputs(model, sequences, layer_names, pad_token_id) -> dict[str, torch.Tensor]:
    """Independent of the library's collector: plain forward hooks → {layer: (tokens, n) float64} at real tokens."""
    modules = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layer_names}
    mask_holder = {}

    device = next(model.parameters()).device

    def make_hook(name):
        def hook(module, args, output):
            rows[name].append(args[0].detach()[mask_holder["mask"]].double().cpu())

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in layer_names]
    try:
        with torch.no_grad():
            for batch in iter_batches(sequences, 8, pad_token_id):
                batch = {key: value.to(device) for key, value in batch.items()}
                mask_holder["mask"] = batch["attention_mask"].bool()
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(chunks) for name, chunks in rows.items()}


def leakage(weight_now: torch.Tensor, weight_ref: torch.Tensor, x: torch.Tensor) -> float:
    """‖(W − W_ref) Xᵀ‖ / ‖W_ref Xᵀ‖ in float64."""
    weight_now, weight_ref = weight_now.detach().cpu().double(), weight_ref.detach().cpu().double()
    delta = weight_now - weight_ref
    return float((x @ delta.T).norm() / (x @ weight_ref.T).norm())


def load_reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


COMMON = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=10,
    learning_rate=3e-2,
    logging_steps=5,
    report_to="none",
    save_strategy="no",
    use_cpu=USE_CPU,
    bf16=False,
    seed=0,
    beta=0.0,
)
# 56 preservation tokens < every input width (64, 128): C is rank-deficient, and with a tiny α the
# null space is the exact one, so leakage is fp32 round-off. The paper's α = 5e-5 is tested for its bound.
NSPO_COMMON = dict(nspo_preservation_max_length=PRESERVATION_MAX_LENGTH, nspo_heldout_fraction=0.0, nspo_alpha=1e-10)


def nspo_args(tmp_path, **overrides) -> NSPOConfig:
    return NSPOConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **NSPO_COMMON, **overrides})


def make_trainer(model_dir, tokenizer, prompts, preservation, args, reward_funcs=refusal_reward, **kwargs):
    return NSPOTrainer(
        model=model_dir,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        preservation_dataset=preservation,
        **kwargs,
    )


class LocalHub:
    """A stand-in for ``huggingface_hub.HfApi`` whose remote is a folder: ``<remote>/<owner>/<name>/``.

    It keeps the Hub's rules that the code under test relies on: a repo must be created before anything is
    uploaded to it and must exist to be downloaded (else ``RepositoryNotFoundError``), uploads honour
    ``allow_patterns``/``ignore_patterns`` with huggingface_hub's own filter (``filter_repo_objects``, the one
    ``HfApi.upload_folder`` applies), and a download is a copy in a cache folder, never the remote itself.
    """

    def __init__(self, root: Path) -> None:
        self.remote, self.cache = root / "remote", root / "cache"
        self.remote.mkdir(parents=True, exist_ok=True)
        self.commits: list[dict] = []

    def _repo(self, repo_id: str) -> Path:
        from huggingface_hub.errors import RepositoryNotFoundError

        folder = self.remote / repo_id
        if not folder.is_dir():
            raise RepositoryNotFoundError(f"404 Client Error: Repository Not Found for url: hub/{repo_id}")
        return folder

    def create_repo(self, repo_id: str, private: bool | None = None, exist_ok: bool = False, **kwargs):
        from types import SimpleNamespace

        from huggingface_hub.errors import HfHubHTTPError

        folder = self.remote / repo_id
        if folder.is_dir() and not exist_ok:
            raise HfHubHTTPError(f"409 Conflict: {repo_id} already exists")
        folder.mkdir(parents=True, exist_ok=True)
        return SimpleNamespace(repo_id=repo_id, url=f"hub/{repo_id}")

    def upload_folder(self, repo_id, folder_path, commit_message=None, allow_patterns=None, ignore_patterns=None,
                      run_as_future=False, revision=None, **kwargs):  # fmt: skip
        import shutil
        from types import SimpleNamespace

        from huggingface_hub.utils import filter_repo_objects

        target = self._repo(repo_id)
        files = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file())
        sent = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        for name in sent:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(folder_path) / name, target / name)
        self.commits.append({"repo_id": repo_id, "message": commit_message, "files": sent})
        return SimpleNamespace(commit_url=f"hub/{repo_id}/commit/{len(self.commits)}")

    def snapshot_download(self, repo_id: str, revision: str | None = None, **kwargs) -> str:
        import shutil

        source = self._repo(repo_id)
        copy = self.cache / repo_id.replace("/", "--")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(source, copy)
        return str(copy)

    def files(self, repo_id: str) -> set[str]:
        """Every file of the remote repo, as paths relative to it."""
        return {p.relative_to(self._repo(repo_id)).as_posix() for p in self._repo(repo_id).rglob("*") if p.is_file()}
