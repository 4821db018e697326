"""The alignment tax in a few numbers: refusal on held-out harmful prompts, drift on held-out general ones.

Shared by the end-of-run summary of ``nspo_trl.cli.train`` (``heldout_harmful_dataset`` /
``heldout_general_dataset``) and ``benchmarks/alignment_tax.py``. Judges are rule-based and need no
model: a response is *refused* when an explicit refusal phrase appears
(:data:`nspo_trl.judge.rules.REFUSAL_PATTERN`, an apology counts) and *declined* when it says it
cannot or will not do the request (:data:`~nspo_trl.judge.rules.DECLINE_PATTERN`, the strict judge);
with a Llama Guard server use ``nspo_trl.eval``.

Drift is measured teacher-forced on the reference model's own greedy answers to the general prompts
(see :func:`nspo_trl.eval.drift.drift_report`): ``KL(ref ‖ model)`` per answer token and top-1
agreement. Leakage per layer kind (:func:`layer_kind_leakage`) covers what NSPO may leave free.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nspo_trl.eval.answers import answer_sequences, greedy_answers
from nspo_trl.eval.drift import drift_report
from nspo_trl.judge.rules import declined, refused
from nspo_trl.nullspace.targets import FULL_PRESET, PRESETS, layer_kind


@torch.no_grad()
def layer_kind_leakage(model, reference, sequences: list[list[int]], pad_token_id: int) -> dict[str, float]:
    """Max relative output change per layer kind on ``sequences``, ``model`` against ``reference``.

    ``mlp`` / ``attention`` / ``other``: every linear's ``‖X ΔWᵀ‖/‖X W_refᵀ‖`` (X: the reference's inputs;
    ``other`` is what neither preset names, the output layer ``lm_head`` on decoder LMs, whose X are the final
    hidden states, tied to the embeddings or not); ``embedding``: ``‖ΔE[t]‖/‖E[t]‖`` over the tokens ``t``
    that occur; ``norm``: ``‖Δγ‖/‖γ‖``.
    """
    # every linear by regex (the `full` preset name would drop a tied lm_head, which NSPO cannot train)
    report = drift_report(model, reference, sequences, pad_token_id, [PRESETS[FULL_PRESET]], progress=False)
    kinds = {"mlp": 0.0, "attention": 0.0, "other": 0.0}
    for name, layer in report["layers"].items():
        kind = layer_kind(name)
        kinds[kind] = max(kinds[kind], layer["leakage"])
    tokens = torch.tensor(sorted({t for s in sequences for t in s}))
    emb, emb_ref = model.get_input_embeddings().weight, reference.get_input_embeddings().weight
    kinds["embedding"] = float((emb[tokens] - emb_ref[tokens]).norm() / emb_ref[tokens].norm())
    norms = [
        float((p - reference.get_parameter(n)).norm() / reference.get_parameter(n).norm())
        for n, p in model.named_parameters()
        if "norm" in n
    ]
    kinds["norm"] = max(norms, default=0.0)
    return kinds


JUDGED_TOKENS = 64
"""Answer length for the learned judge's figures: it misreads answers cut much shorter (``docs/judge.md``)."""


class HeldoutSummary:
    """Before/after figures of one training run, on prompts it never trains on.

    ``reference`` is the untrained model, loaded on its own (a second full copy: single-process runs of
    small models only). It answers the general prompts greedily and its refusal rate on the harmful
    ones is measured once; :meth:`after` measures the trained model the same way. With ``learned_judge``
    (the ``judge`` extra installed) it also reports the learned judge's unsafe rate on the harmful prompts
    and, given ``overrefusal_prompts``, its refusal rate on those; with ``capability`` the exact-match
    score of :mod:`nspo_trl.eval.exact_match`; each before and after.
    """

    def __init__(
        self,
        reference,
        tokenizer,
        harmful_prompts: Sequence,
        general_prompts: Sequence,
        max_new_tokens: int,
        overrefusal_prompts: Sequence = (),
        learned_judge: bool = False,
        capability: bool = False,
    ) -> None:
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.harmful, self.general = list(harmful_prompts), list(general_prompts)
        self.overrefusal = list(overrefusal_prompts)
        self.learned_judge, self.capability = learned_judge, capability
        self.reference = reference.eval().requires_grad_(False)
        self.refusal_before = self.refusal_rates(self.reference)
        self.extra_before = self.extra_figures(self.reference)
        answers = greedy_answers(self.reference, tokenizer, self.general, max_new_tokens)
        self.sequences = answer_sequences(tokenizer, self.general, answers)

    def extra_figures(self, model) -> dict[str, float]:
        """The learned judge's unsafe and over-refusal rates and the capability score, as configured."""
        figures: dict[str, float] = {}
        if self.learned_judge:
            from nspo_trl.eval.judges import pair_judge
            from nspo_trl.judge.rules import prompt_text

            judge = pair_judge("learned")
            for key, prompts, harmful in (("learned_unsafe", self.harmful, True),
                                          ("learned_overrefusal", self.overrefusal, False)):  # fmt: skip
                if prompts:
                    answers = greedy_answers(model, self.tokenizer, prompts, JUDGED_TOKENS)
                    rows = judge([prompt_text(p) for p in prompts], answers, [harmful] * len(prompts))
                    figures[key] = sum(r["unsafe" if harmful else "refused"] for r in rows) / len(rows)
        if self.capability:
            from nspo_trl.eval.exact_match import capability_score

            figures["capability"] = capability_score(model, self.tokenizer)["score"]
        return figures

    def refusal_rates(self, model) -> tuple[float, float]:
        """Shares of the harmful prompts the model refuses by the keyword judge and by the strict one."""
        answers = greedy_answers(model, self.tokenizer, self.harmful, self.max_new_tokens)
        return (sum(map(refused, answers)) / len(answers), sum(map(declined, answers)) / len(answers))

    def after(self, model) -> dict[str, float]:
        drift = drift_report(model, self.reference, self.sequences, self.tokenizer.pad_token_id, None, progress=False)
        keyword, strict = self.refusal_rates(model)
        extra = {f"{k}_before": v for k, v in self.extra_before.items()}
        extra.update({f"{k}_after": v for k, v in self.extra_figures(model).items()})
        return {
            **extra,
            "heldout_refusal_before": self.refusal_before[0],
            "heldout_refusal_after": keyword,
            "heldout_declined_before": self.refusal_before[1],
            "heldout_declined_after": strict,
            "general_kl_mean": drift["kl_mean"],
            "general_top1_agreement": drift["top1_agreement"],
        }
