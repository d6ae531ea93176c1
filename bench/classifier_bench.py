"""Moderation decisions per second against the naive way, on the ~60M benchmark weights.

Naive: for every text, transformers' `generate` of a few tokens on the full mistral-13 prompt,
then read the answer word. Ours: the classifier (label scoring over a token tree, the policy
prefix pre-filled once, texts batched). Also prints the prompt tokens computed per decision
with and without the shared prefix. Target from the moderation issue: >= 5x.

    python bench/classifier_bench.py [--texts N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench_checkpoint, machine
from moderation.core.builtin_policies import BUILTIN_POLICIES
from moderation.core.classifier import Classifier
from moderation.core.decision import ClassifyItem
from moderation.core.policy import Role
from moderation.core.prompts import build_prompt
from moderation.runtime import load_runtime

SHORT_TEXTS = [
    "How do I reset my router?",
    "You are an idiot and everyone hates you.",
    "What's a good recipe for pancakes?",
    "How can I pick a lock without a key?",
    "Should I sell all my stocks today?",
    "Tell me a bedtime story about a dragon.",
    "Where can I buy cheap prescription pills online?",
    "Translate 'good morning' into Spanish.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=32, help="texts per measurement")
    parser.add_argument("--naive-texts", type=int, default=6, help="texts for the slow baseline")
    ns = parser.parse_args()
    from transformers import MistralForCausalLM

    policy = BUILTIN_POLICIES["mistral-13"]
    texts = [SHORT_TEXTS[i % len(SHORT_TEXTS)] + f" ({i})" for i in range(ns.texts)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = bench_checkpoint(Path(tmp), layout="hf")
        hf = MistralForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
        runtime = load_runtime(folder, device="cpu", dtype="float32", score_batch_size=32)
    tok, engine = runtime.tokenizer, runtime.engine
    print(f"# classifier vs naive generate, 60M config, mistral-13 policy; {machine()}")

    # Naive: one full prompt per text, generate a few tokens, read the word.
    labels = [*policy.labels]
    naive_texts = texts[: ns.naive_texts]
    naive_tokens = 0
    start = time.perf_counter()
    for text in naive_texts:
        prompt = build_prompt(policy, Role.INPUT, tok, text).tokens
        naive_tokens += len(prompt)
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0
            )
        answer = tok.decode(out[0, len(prompt) :].tolist()).strip().lower()
        _ = next((label for label in labels if answer.startswith(label)), None)
    naive_rate = len(naive_texts) / (time.perf_counter() - start)

    items = [ClassifyItem(t, policy="mistral-13") for t in texts]
    classifier = runtime.classifier
    # A server that names the policy (--policy, --warm-policies) pre-fills it at start-up.
    classifier.warm_up(["mistral-13"])
    classifier.classify_many(items[:4])
    before = engine.stats.tokens_computed
    start = time.perf_counter()
    classifier.classify_many(items)
    ours_rate = len(items) / (time.perf_counter() - start)
    tokens_with_prefix = (engine.stats.tokens_computed - before) / len(items)

    plain = Classifier(engine, tok, runtime.planner, model_id=runtime.model_id, reuse_prefix=False)
    before = engine.stats.tokens_computed
    start = time.perf_counter()
    plain.classify_many(items)
    plain_rate = len(items) / (time.perf_counter() - start)
    tokens_without_prefix = (engine.stats.tokens_computed - before) / len(items)

    print(f"{'method':46} {'decisions/s':>12} {'tokens/decision':>16}")
    print(f"{'naive: HF generate(4) on the full prompt':46} {naive_rate:12.2f} "
          f"{naive_tokens / len(naive_texts) + 4:16.0f}")  # fmt: skip
    print(f"{'ours, shared prefix reused':46} {ours_rate:12.2f} {tokens_with_prefix:16.0f}")
    print(f"{'ours, no prefix reuse':46} {plain_rate:12.2f} {tokens_without_prefix:16.0f}")
    ratio = ours_rate / naive_rate
    print(f"speed-up over naive: {ratio:.1f}x (target >= 5x): {'met' if ratio >= 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
