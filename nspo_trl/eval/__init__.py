"""Evaluation of the alignment tax: safety, over-refusal, capability and preservation drift.

``python -m nspo_trl.eval --model PATH [--reference PATH] --suite safety,overrefusal,capability,drift``
"""
