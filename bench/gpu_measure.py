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
import functools
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
import traceback
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
from model import Engine, GenerationRequest, ModelArgs
from model.args import MISTRAL_7B
from model.attention import flash_import_error, select_backend
from model.errors import EngineError
from model.memory import GiB, plan_engine_memory, weights_bytes
from model.transformer import Transformer

# The backends to compare, by the names `--attention-backend` takes; those the engine does not
# accept (yet) are reported null with its refusal.
BACKENDS = ("sdpa", "flex", "flash")
# Figure labels: batch 1 and 32, contexts 1k and 4k.
BATCHES = (1, 32)
CONTEXTS = (1024, 4096)
# Cards as torch reports them (mem_get_info's total).
SIMULATED = {"h200_141gb": int(139.7 * GiB), "h100_80gb": int(79.1 * GiB)}
LOGIT_BOUND = {torch.bfloat16: 0.06, torch.float32: 1e-3}
# Rotated and numbered into the 20-token texts of the decisions/s figure.
SENTENCE = "please tell me how the weather is going to be in paris next week and why"


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the parts measure on: the 7B on CUDA, or (GPU_CHECK_REHEARSE=1) a tiny model of
    the 7B's vocabulary on the CPU, whose figures mean nothing but which runs every line of
    the measuring code where no GPU is lent (tests/test_gpu_check.py)."""

    device: str
    args: ModelArgs  # the engine parts' model
    parity_args: ModelArgs  # ours vs transformers: the 7B layer shape, a wrapping window
    parity_tokens: int
    batches: tuple[int, int]  # measured as BATCHES
    contexts: tuple[int, int]  # measured as CONTEXTS
    prefill_tokens: int
    decode_steps: int = 24  # timed, per point
    decision_rounds: int = 4  # texts: this many passes of every scoring slot
    latency_calls: int = 60
    rehearsal: bool = False


def setup() -> Setup:
    if os.environ.get("GPU_CHECK_REHEARSE"):
        tiny = dataclasses.replace(
            MISTRAL_7B,
            dim=64,
            n_layers=2,
            head_dim=16,
            hidden_dim=128,
            n_heads=4,
            n_kv_heads=2,
            sliding_window=64,
        )
        return Setup(
            "cpu",
            tiny,
            dataclasses.replace(tiny, sliding_window=16),
            70,
            (1, 3),
            (40, 100),
            256,
            decode_steps=4,
            decision_rounds=1,
            latency_calls=4,
            rehearsal=True,
        )
    layers2 = dataclasses.replace(MISTRAL_7B, n_layers=2, sliding_window=256, max_seq_len=4096)
    return Setup("cuda", MISTRAL_7B, layers2, 700, BATCHES, CONTEXTS, 8192)


SETUP = setup()


def cuda_absent(fig: FigureFile, *prefixes: str) -> bool:
    if torch.cuda.is_available() or SETUP.rehearsal:
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


def guarded(fig: FigureFile, names: tuple[str, ...], fn: Callable[[], None]) -> None:
    """Run one measurement; if it raises (an out-of-memory, an engine error), its figures
    still null get the error as their reason and the part goes on with the next."""
    try:
        fn()
    except Exception as exc:  # one measurement's failure must not cost the others
        reason = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        for name in names:
            fig.unmeasured(name, reason)
        print(f"FAIL {', '.join(names)}: {reason}", flush=True)
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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

    def against_cpu() -> None:
        checks = run(SETUP.device, ["bf16", "fp32"])
        for c in checks:
            print(c.line())
        passed = sum(c.ok is True for c in checks)
        failed = "; ".join(c.line() for c in checks if c.ok is not True)
        fig.set(
            "parity.cuda_vs_cpu",
            f"{passed}/{len(checks)}",
            met=passed == len(checks),
            detail=failed or "all PASS",
        )

    guarded(fig, ("parity.cuda_vs_cpu",), against_cpu)
    reason = optional("transformers") or optional("safetensors")
    names = ("parity.transformers_cuda.bf16", "parity.transformers_cuda.fp32")
    if reason is not None:
        for name in names:
            fig.null(name, reason)
        return
    guarded(fig, names, lambda: transformers_parity(fig))


def transformers_parity(fig: FigureFile) -> None:
    """Ours against transformers on the device, at the 7B layer shape (bench/gpu_parity.py)."""
    from bench.gpu_parity import against_transformers

    args, n = SETUP.parity_args, SETUP.parity_tokens
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        diff, detail = against_transformers(args, n, SETUP.device, dtype)
        fig.set(f"parity.transformers_cuda.{name}", diff, met=diff <= LOGIT_BOUND[dtype],
                detail=detail)  # fmt: skip
        empty_cache()


ENGINE_FIGURES = (
    "startup_seconds",
    "memory_plan.7b.this_card",
    "activation_peak_vs_estimate",
    "prefill.tokens_per_s",
    "prefill.mfu",
    "host_syncs_per_decode_step",
    "decisions_per_s",
    "classify_latency_ms.p50",
    "classify_latency_ms.p99",
)


def engine_figures(fig: FigureFile) -> None:
    """The serving default (--max-batch-size auto) on random 7B weights: each measurement
    guarded, so one that fails (an out-of-memory) leaves the others."""
    if cuda_absent(fig, *ENGINE_FIGURES, "decode.eager"):
        return
    model = random_model(SETUP.args, SETUP.device)
    start = time.perf_counter()
    engine = Engine(model, max_batch_size="auto", score_batch_size="auto", max_context=8192)
    sync(engine)
    fig.set(
        "startup_seconds",
        time.perf_counter() - start,
        detail="Engine() on loaded weights: memory plan, cache allocation (eager)",
    )
    fig.set("memory_plan.7b.this_card", engine.memory.slots, detail=engine.memory.describe())
    guarded(fig, ENGINE_FIGURES[5:], lambda: decisions(fig, engine))
    guarded(fig, ENGINE_FIGURES[2:5], lambda: prefill(fig, engine))
    for label_b, batch in zip(BATCHES, SETUP.batches, strict=True):
        for label_c, context in zip(CONTEXTS, SETUP.contexts, strict=True):
            name = f"decode.eager.batch{label_b}.ctx{label_c}"
            guarded(fig, (name,), functools.partial(decode, fig, engine, name, batch, context))
    guarded(fig, ENGINE_FIGURES[5:6], lambda: syncs(fig, engine))


def prefill(fig: FigureFile, engine: Engine) -> None:
    n = SETUP.prefill_tokens
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, engine.args.vocab_size, (n,), generator=g).tolist()

    def run() -> None:
        engine.cache.reset(0)
        engine.passes.prefill([0], [tokens])

    run()  # warm-up
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t = timed(run)
    engine.cache.reset(0)
    est = engine.memory.activation_bytes
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
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


def decode(fig: FigureFile, engine: Engine, name: str, batch: int, context: int) -> None:
    if batch > engine.max_batch_size:
        fig.null(name, f"the engine has {engine.max_batch_size} generation slots")
        return
    step = decode_rate(engine, batch, context, SETUP.decode_steps)
    roofline = batch * PEAK_TBPS * 1e12 / decode_bytes(engine, batch, context)
    rate = batch / step
    fig.set(
        name,
        rate,
        met=rate >= 0.75 * roofline if batch == 1 else None,
        detail=f"{step * 1e3:.2f} ms/step (median of {SETUP.decode_steps}, batch held at {batch}), "
        f"{rate / roofline:.0%} of the {roofline:,.0f} tok/s roofline",
    )


def syncs(fig: FigureFile, engine: Engine) -> None:
    ids = [
        engine.add_request(GenerationRequest([5 + i] * 64, 40, stop_tokens=frozenset()))
        for i in range(8)
    ]
    for _ in range(3):
        engine.step()
    device = engine.model.device.type
    counts = count_host_syncs(lambda: [engine.step() for _ in range(8)], device_type=device)
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
    names = ("decisions_per_s", "classify_latency_ms.p50", "classify_latency_ms.p99")
    reason = optional("sentencepiece")
    if reason is None and importlib.util.find_spec("mistral_common") is None:
        reason = "mistral-common's tokenizer file is absent; `make gpu-bundle` brings it"
    if reason is not None:
        for name in names:
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
    # A server that names the policy (--policy, --warm-policies) pre-fills it at start-up.
    classifier.warm_up(["mistral-13"])
    words = SENTENCE.split()
    texts = []
    for i in range(SETUP.decision_rounds * engine.score_batch_size):
        ids = tok.encode(" ".join(words[i % 7 :] + words[: i % 7]) + f" {i}", bos=False)
        texts.append(tok.decode(ids[:20]))
    items = [ClassifyItem(t, policy="mistral-13") for t in texts]
    classifier.classify_many(items[:8])  # warm-up
    t = timed(lambda: classifier.classify_many(items))
    rate = len(items) / t
    fig.set(
        "decisions_per_s",
        rate,
        met=rate >= 1000,
        detail=f"{len(items)} texts of ~20 tokens, {engine.score_batch_size} per pass",
    )
    latencies = []
    for text in texts[: SETUP.latency_calls]:
        call = functools.partial(classifier.classify, text, policy="mistral-13")
        latencies.append(timed(call) * 1e3)
    q = statistics.quantiles(latencies, n=100)
    fig.set(
        "classify_latency_ms.p50",
        q[49],
        met=q[49] <= 15,
        detail=f"one caller, in process (no gRPC hop), {len(latencies)} calls",
    )
    fig.set(
        "classify_latency_ms.p99", q[98], detail=f"one caller, in process, {len(latencies)} calls"
    )


def backends(fig: FigureFile) -> None:
    """Each backend the engine accepts against SDPA: logits of one pre-fill past the window
    (bounded) and its time."""
    if cuda_absent(fig, "backends."):
        return
    model = random_model(SETUP.args, SETUP.device)
    g = torch.Generator().manual_seed(2)
    n = SETUP.args.window * 3 // 2
    prompt = torch.randint(3, SETUP.args.vocab_size, (n,), generator=g).tolist()
    rows = list(range(0, n, 61))
    logits: dict[str, torch.Tensor] = {}
    for name in BACKENDS:
        figure = f"backends.{name}_vs_sdpa"
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
                fig.null(figure, f"the engine refuses backend {name!r}: {exc}")
            continue

        def measure(engine: Engine = engine, name: str = name, figure: str = figure) -> None:
            engine.passes.forward([0], [prompt[: n // 8]], logits_rows=[])  # warm-up
            engine.cache.reset(0)
            start = time.perf_counter()
            logits[name] = engine.passes.forward([0], [prompt], logits_rows=rows)
            sync(engine)
            t = time.perf_counter() - start
            print(f"{name}: pre-fill of {n} tokens {t * 1e3:.0f} ms")
            if name != "sdpa" and "sdpa" in logits:
                diff = relative_diff(logits[name], logits["sdpa"])
                fig.set(
                    figure,
                    diff,
                    met=diff <= LOGIT_BOUND[torch.bfloat16],
                    detail=f"bf16, {n}-token pre-fill past the window; {t * 1e3:.0f} ms",
                )

        guarded(fig, (figure,), measure)
        del engine
        empty_cache()


def graphed(fig: FigureFile) -> None:
    if cuda_absent(fig, "decode.graphed", "capture"):
        return
    if SETUP.rehearsal:
        fig.unmeasured("decode.graphed", "rehearsal: graphs are measured on CUDA only")
        fig.unmeasured("capture", "rehearsal: graphs are measured on CUDA only")
        return
    model = random_model(SETUP.args, SETUP.device)
    start = time.perf_counter()
    engine = Engine(
        model, max_batch_size=max(SETUP.batches), score_batch_size=1, max_context=8192, compile=True
    )
    built = time.perf_counter() - start
    if not engine.compile:
        fig.unmeasured("decode.graphed", "the engine declined compile=True")
        return
    reported = getattr(engine, "capture_seconds", None)  # an engine that captures at start-up
    if reported is not None:
        fig.set("capture_seconds", float(reported), detail="as the engine reports it")
    first = time.perf_counter()
    for label_b, batch in zip(BATCHES, SETUP.batches, strict=True):
        for label_c, context in zip(CONTEXTS, SETUP.contexts, strict=True):
            name = f"decode.graphed.batch{label_b}.ctx{label_c}"
            guarded(fig, (name,), functools.partial(decode, fig, engine, name, batch, context))
            if reported is None and (batch, context) == (SETUP.batches[0], SETUP.contexts[0]):
                fig.set(
                    "capture_seconds",
                    built + time.perf_counter() - first,
                    detail="Engine(compile=True) and its first graphed decode run (the "
                    "engine compiles and captures on first use and reports no capture "
                    "time)",
                )


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
