"""Scoring and evaluation: exact benchmark scorers and held-out evaluation of trained runs.

Scorers take predictions and gold answers only, so any model's harness can use them.
"""
