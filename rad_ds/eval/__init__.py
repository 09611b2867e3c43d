"""Evaluation: GSM8K-style math, HumanEval and CRUXEval-style code (run in a sandbox), perplexity, and
decoding speed (plain and self-speculative), for base, student and teacher side by side."""
