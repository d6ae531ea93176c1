"""The parts of bench/gpu_check.sh, one per call, each writing its figures into
gpu_figures.json as it measures them (bench/gpu_figures.py), so a part stopped at its timeout
keeps what it had.

    PYTHONPATH=. python bench/gpu_measure.py PART FILE
    PART: env | plan | parity | engine | backends | graphed

Imports torch and the engine; transformers (the reference parity) and the tokenizer
(decisions/s and Classify latency need sentencepiece and mistral-common's tokenizer file) only
where they import, else those figures are null with the reason. Without CUDA every CUDA figure
is null ("CUDA absent") and the part exits 0; the 7B memory plans are arithmetic and run
anywhere.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.gpu_bench import (
    count_host_syncs,
    decode_bytes,
    decode_rate,
    prefill_flops,
    random_model,
    sync,
)
from bench.gpu_figures import PEAK_TBPS, PEAK_TFLOPS, FigureFile
from model import Engine, GenerationRequest
from model.args import MISTRAL_7B
from model.attention import flash_import_error, select_backend
from model.errors import EngineError
from model.memory import GiB, plan_engine_memory, weights_bytes
from model.transformer import Transformer

# The backends to compare, by the names `--attention-backend` takes; those the engine does not
# accept (yet) are reported null with its refusal.
BACKENDS = ("sdpa", "flex", "flash")
CONTEXTS = (1024, 4096)
BATCHES = (1, 32)
# Cards as torch reports them (mem_get_info's total).
SIMULATED = {"h200_141gb": int(139.7 * GiB), "h100_80gb": int(79.1 * GiB)}
LOGIT_BOUND = {torch.bfloat16: 0.06, torch.float32: 1e-3}


def cuda_absent(fig: FigureFile, *prefixes: str) -> bool:
    if torch.cuda.is_available():
        return False
    for prefix in prefixes:
        fig.unmeasured(prefix, f"CUDA absent (torch {torch.__version__}, this host has no GPU)")
    print("SKIP: CUDA absent")
    return True


def optional(module: str) -> str | None:
    """None when `module` imports, else why not."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # whatever a broken install raises
        return (
            f"{module} does not import ({type(exc).__name__}: {exc}); `make gpu-bundle` brings it"
        )
    return None


def relative_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = max(1.0, float(ref.float().abs().max()))
    return float((got.float() - ref.float()).abs().max()) / scale


# ------------------------------------------------------------------ parts


def env(fig: FigureFile) -> None:
    facts: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "flash_attn": flash_import_error() or "imports",
    }
    try:
        facts["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        facts["triton"] = "absent"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        total = torch.cuda.mem_get_info()[1]
        facts["device"] = f"{torch.cuda.get_device_name()}, {total / GiB:.1f} GiB"
    accepted = {}
    for name in ("auto", *BACKENDS):
        try:
            accepted[name] = select_backend(name, device, torch.bfloat16).name
        except EngineError as exc:
            accepted[name] = f"refused: {exc}"
    facts["attention_backends_bf16"] = accepted
    for module in ("transformers", "sentencepiece", "safetensors", "pytest"):
        facts[module] = optional(module) or "imports"
    facts["mistral_common_tokenizer"] = (
        "present" if importlib.util.find_spec("mistral_common") else "absent"
    )
    fig.environment(**facts)
    for k, v in facts.items():
        print(f"{k}: {v}")


def plan(fig: FigureFile) -> None:
    """The engine's memory plan at the 7B shape (bf16, 8192 context, --max-batch-size auto) on
    this card and on simulated ones: arithmetic, so it runs anywhere."""
    with torch.device("meta"):
        weights = weights_bytes(Transformer(MISTRAL_7B).to(torch.bfloat16))
    cards = dict(SIMULATED)
    if torch.cuda.is_available():
        cards["this_card"] = torch.cuda.mem_get_info()[1]
    else:
        fig.null("memory_plan.7b.this_card", "CUDA absent: the simulated cards are planned")
    for name, total in cards.items():
        p = plan_engine_memory(
            MISTRAL_7B,
            torch.bfloat16,
            device="cuda:0",
            weights_bytes=weights,
            max_batch_size="auto",
            score_batch_size="auto",
            chunk_tokens=4096,
            step_tokens=4096,
            max_context=8192,
            device_total_bytes=total,
            device_free_bytes=total - weights - GiB // 2,
        )
        fig.set(f"memory_plan.7b.{name}", p.generation_slots + p.scoring_slots, detail=p.describe())


def parity(fig: FigureFile) -> None:
    if cuda_absent(fig, "parity."):
        return
    from bench.gpu_parity import run

    checks = run("cuda", ["bf16", "fp32"])
    for c in checks:
        print(c.line())
    passed = sum(c.ok is True for c in checks)
    fig.set(
        "parity.cuda_vs_cpu",
        f"{passed}/{len(checks)}",
        met=passed == len(checks),
        detail="; ".join(c.line() for c in checks if c.ok is not True) or "all PASS",
    )
    reason = optional("transformers") or optional("safetensors")
    if reason is not None:
        for dtype in ("bf16", "fp32"):
            fig.null(f"parity.transformers_cuda.{dtype}", reason)
        return
    transformers_parity(fig)


def transformers_parity(fig: FigureFile) -> None:
    """Ours against transformers' MistralForCausalLM, both on CUDA, at the 7B layer shape (two
    layers, the real vocabulary), a 256-token window wrapped ~3 times: our logits of every
    token from chunked pre-fill and decode steps through the rolling cache, theirs from one
    full forward with the sliding-window mask."""
    from transformers import MistralForCausalLM

    from model.weights import save_hf

    args = dataclasses.replace(MISTRAL_7B, n_layers=2, sliding_window=256, max_seq_len=4096)
    state = {
        k: v.clone() for k, v in random_model(args, "cpu", torch.float32, 3).state_dict().items()
    }
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(3, args.vocab_size, (700,), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(tmp, args, state)
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            hf = MistralForCausalLM.from_pretrained(
                tmp,
                attn_implementation="sdpa",
                dtype=dtype,
            )
            hf = hf.to("cuda").eval()  # type: ignore[arg-type]
            with torch.inference_mode():
                ref = hf(torch.tensor([tokens], device="cuda")).logits[0].float()
            del hf
            with torch.device("meta"):
                ours = Transformer(args)
            ours.load_state_dict({k: v.to("cuda", dtype) for k, v in state.items()}, assign=True)
            engine = Engine(ours.eval(), max_batch_size=1, score_batch_size=1, chunk_size=100)
            got = []
            # Pre-fill chunks of 100 for the first 600 tokens, then decode steps one by one.
            for start, end in [(i, min(i + 100, 600)) for i in range(0, 600, 100)] + [
                (i, i + 1) for i in range(600, len(tokens))
            ]:
                chunk = tokens[start:end]
                got.append(engine.passes.forward([0], [chunk], logits_rows=list(range(len(chunk)))))
            diff = relative_diff(torch.cat(got), ref)
            bound = LOGIT_BOUND[dtype]
            fig.set(
                f"parity.transformers_cuda.{name}",
                diff,
                met=diff <= bound,
                detail=f"{len(tokens)} tokens, window 256, backend {engine.backend.name}",
            )
            del engine, ours
            torch.cuda.empty_cache()


def engine_figures(fig: FigureFile) -> None:
    names = (
        "startup",
        "prefill.",
        "decode.eager",
        "decisions",
        "classify",
        "host_syncs",
        "activation",
        "memory_plan.7b.this_card",
    )
    if cuda_absent(fig, *names):
        return
    model = random_model(MISTRAL_7B)
    start = time.perf_counter()
    engine = Engine(model, max_batch_size="auto", score_batch_size="auto", max_context=8192)
    sync(engine)
    fig.set(
        "startup_seconds",
        time.perf_counter() - start,
        detail="Engine() on loaded weights: memory plan, cache allocation (eager)",
    )
    p = engine.memory
    fig.set("memory_plan.7b.this_card", p.slots, detail=p.describe())
    prefill(fig, engine)
    for batch in BATCHES:
        for context in CONTEXTS:
            decode(fig, engine, "eager", batch, context)
    syncs(fig, engine)
    decisions(fig, engine)


def prefill(fig: FigureFile, engine: Engine, n: int = 8192) -> None:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, engine.args.vocab_size, (n,), generator=g).tolist()

    def run() -> None:
        engine.cache.reset(0)
        engine.passes.prefill([0], [tokens])

    run()  # warm-up
    sync(engine)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = timed(run)
    peak = torch.cuda.max_memory_allocated() - base
    engine.cache.reset(0)
    est = engine.memory.activation_bytes
    fig.set(
        "activation_peak_vs_estimate",
        peak / est,
        met=peak <= est,
        detail=f"measured {peak / GiB:.2f} GiB, estimated {est / GiB:.2f} GiB",
    )
    flops = prefill_flops(engine.args, n, engine.window)
    fig.set("prefill.tokens_per_s", n / t, detail=f"{n} tokens, one sequence, {t * 1e3:.0f} ms")
    mfu = flops / t / (PEAK_TFLOPS * 1e12)
    fig.set("prefill.mfu", mfu, met=mfu >= 0.5, detail=f"{flops / t / 1e12:.0f} TFLOP/s")


def decode(fig: FigureFile, engine: Engine, mode: str, batch: int, context: int) -> None:
    name = f"decode.{mode}.batch{batch}.ctx{context}"
    if batch > engine.max_batch_size:
        fig.null(name, f"the engine has {engine.max_batch_size} generation slots")
        return
    step = decode_rate(engine, batch, context)
    roofline = batch * PEAK_TBPS * 1e12 / decode_bytes(engine, batch, context)
    rate = batch / step
    fig.set(
        name,
        rate,
        met=rate >= 0.75 * roofline if batch == 1 else None,
        detail=f"{step * 1e3:.2f} ms/step (median), {rate / roofline:.0%} of the "
        f"{roofline:,.0f} tok/s roofline",
    )


def syncs(fig: FigureFile, engine: Engine) -> None:
    ids = [
        engine.add_request(GenerationRequest([5 + i] * 64, 40, stop_tokens=frozenset()))
        for i in range(8)
    ]
    for _ in range(3):
        engine.step()
    counts = count_host_syncs(lambda: [engine.step() for _ in range(8)])
    per = counts["syncs"] / 8
    fig.set(
        "host_syncs_per_decode_step",
        per,
        met=per <= 1,
        detail=f"batch 8; host->device copies {counts['host_to_device'] / 8:.1f}/step",
    )
    for i in ids:
        engine.cancel(i)


def decisions(fig: FigureFile, engine: Engine) -> None:
    reason = optional("sentencepiece")
    if reason is None and importlib.util.find_spec("mistral_common") is None:
        reason = "mistral-common's tokenizer file is absent; `make gpu-bundle` brings it"
    if reason is not None:
        for name in ("decisions_per_s", "classify_latency_ms.p50", "classify_latency_ms.p99"):
            fig.null(name, reason)
        return
    from model import Tokenizer
    from model.tokenizer import mistral_common_tokenizer_path
    from moderation.core.builtin_policies import BUILTIN_POLICIES
    from moderation.core.classifier import Classifier
    from moderation.core.decision import ClassifyItem
    from moderation.core.limits import ModelLimits
    from moderation.core.planning import Planner

    tok = Tokenizer.from_file(mistral_common_tokenizer_path("v1"))
    planner = Planner(tok, ModelLimits.of(engine), policies=BUILTIN_POLICIES)
    classifier = Classifier(engine, tok, planner, model_id="random 7B")
    classifier.warm_up()
    words = ["please", "tell", "me", "how", "the", "weather", "is", "going", "to", "be", "in",
             "paris", "next", "week", "and", "why"]  # fmt: skip
    texts = []
    for i in range(4 * engine.score_batch_size):
        ids = tok.encode(" ".join(words[i % 5 :] + words[: i % 5]) + f" {i}")[:20]
        texts.append(tok.decode(ids))
    items = [ClassifyItem(t, policy="mistral-13") for t in texts]
    classifier.classify_many(items[:8])  # warm-up
    t = timed(lambda: classifier.classify_many(items))
    rate = len(items) / t
    fig.set(
        "decisions_per_s",
        rate,
        met=rate >= 1000,
        detail=f"{len(items)} texts of <= 20 tokens, {engine.score_batch_size} per pass",
    )
    latencies = []
    for text in texts[:60]:
        start = time.perf_counter()
        classifier.classify(text, policy="mistral-13")
        latencies.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(latencies, n=100)
    fig.set(
        "classify_latency_ms.p50",
        q[49],
        met=q[49] <= 15,
        detail="one caller, in process (no gRPC hop), 60 calls",
    )
    fig.set("classify_latency_ms.p99", q[98], detail="one caller, in process, 60 calls")


def backends(fig: FigureFile) -> None:
    if cuda_absent(fig, "backends."):
        return
    model = random_model(MISTRAL_7B)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, MISTRAL_7B.vocab_size, (6144,), generator=g).tolist()  # > window
    rows = list(range(0, len(prompt), 61))
    logits: dict[str, torch.Tensor] = {}
    for name in BACKENDS:
        try:
            engine = Engine(
                model,
                max_batch_size=1,
                score_batch_size=1,
                backend=name,
                max_context=8192,
                cache_memory_bytes=4 * GiB,
            )
        except EngineError as exc:
            if name != "sdpa":
                fig.null(f"backends.{name}_vs_sdpa", f"the engine refuses backend {name!r}: {exc}")
            continue
        engine.passes.forward([0], [prompt[:512]], logits_rows=[])  # warm-up
        engine.cache.reset(0)
        start = time.perf_counter()
        logits[name] = engine.passes.forward([0], [prompt], logits_rows=rows)
        sync(engine)
        t = time.perf_counter() - start
        print(f"{name}: pre-fill of {len(prompt)} tokens {t * 1e3:.0f} ms")
        if name != "sdpa" and "sdpa" in logits:
            diff = relative_diff(logits[name], logits["sdpa"])
            fig.set(
                f"backends.{name}_vs_sdpa",
                diff,
                met=diff <= LOGIT_BOUND[torch.bfloat16],
                detail=f"bf16, {len(prompt)}-token pre-fill past the window; {t * 1e3:.0f} ms",
            )
        del engine
        torch.cuda.empty_cache()


def graphed(fig: FigureFile) -> None:
    if cuda_absent(fig, "decode.graphed", "capture"):
        return
    model = random_model(MISTRAL_7B)
    start = time.perf_counter()
    engine = Engine(
        model, max_batch_size=max(BATCHES), score_batch_size=1, max_context=8192, compile=True
    )
    built = time.perf_counter() - start
    reported = getattr(engine, "capture_seconds", None)  # an engine that captures at start-up
    if not engine.compile:
        fig.unmeasured("decode.graphed", "the engine declined compile=True")
        return
    if reported is not None:
        fig.set("capture_seconds", float(reported), detail="as the engine reports it")
    first = time.perf_counter()
    decode(fig, engine, "graphed", 1, CONTEXTS[0])
    if reported is None:
        fig.set(
            "capture_seconds",
            built + time.perf_counter() - first,
            detail="Engine(compile=True) and its first graphed decode run (compiles and "
            "captures on first use: the engine reports no capture time)",
        )
    for batch in BATCHES:
        for context in CONTEXTS:
            if (batch, context) != (1, CONTEXTS[0]):
                decode(fig, engine, "graphed", batch, context)


def timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


PARTS: dict[str, Callable[[FigureFile], None]] = {
    "env": env,
    "plan": plan,
    "parity": parity,
    "engine": engine_figures,
    "backends": backends,
    "graphed": graphed,
}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in PARTS:
        print(__doc__, file=sys.stderr)
        return 2
    PARTS[argv[0]](FigureFile(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
