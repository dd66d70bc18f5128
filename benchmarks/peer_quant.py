"""mlx-lm's own 4-bit methods (AWQ, GPTQ, DWQ, dynamic mixed precision) on the real Gemma 3 270M,
measured with our evaluation, beside our RTN anchor.

    python benchmarks/peer_quant.py [--methods rtn mlx-lm-rtn gptq ours-gptq awq ours-awq dynamic budget dwq]
        [--tokens 512]
        [--samples 32] [--length 256] [--awq-samples 8] [--awq-grid 10] [--dynamic-samples 8]
        [--target-bpw 4.75] [--budget-samples 1] [--budget-length 32] [--dwq-samples 8]
        [--dwq-lr 1e-6] [--timeout 1800] [--eval-text FILE]
        [--json benchmarks/results/peer_quant_gemma3_270m.json] [--out FILE.md]

Methods (all 4-bit affine, group 64, embedding (the tied LM head) included, float32 scales):
- `rtn`: ours, `gemma_mlx.convert.convert(bits=4, group_size=64)` (the anchor of
  benchmarks/calibrated_quality.py's table).
- `mlx-lm-rtn`: `mlx_lm.utils.quantize_model` (a check of this script's plumbing: same rounding as
  ours, so the same numbers are expected).
- `gptq`: `mlx_lm.quant.gptq.gptq_quantize` (fallback for non-Linear layers, i.e. the embedding:
  4-bit g64, like ours). The Hessians are collected through the decoder only (`model.model`),
  skipping the 262144-wide LM head: the head is the tied embedding, which GPTQ does not touch.
- `ours-gptq`, `ours-awq`: ours (`convert(method=...)`) on the same calibration tokens as
  mlx-lm's GPTQ (`--samples`) and AWQ (`--awq-samples`, `--awq-grid`) rows.
- `awq`: `mlx_lm.quant.awq.awq_quantize` with its `gemma3_text` config (embedding 4-bit g64).
- `dynamic`: `mlx_lm.quant.dynamic_quant`: `estimate_sensitivities` (4-bit g64 low, 5-bit g64
  high), `estimate_threshold` for `--target-bpw` (ours, bf16 scales: converted to mlx-lm's count,
  which uses the stored float32 scales), `quantize_model` with the resulting predicate.
- `budget`: ours at the same budget as `dynamic`: `convert(bits_per_weight=--target-bpw,
  dtype="bfloat16")` (per-unit RTN precisions chosen by measured KL; bf16 scales so that its budget
  counts as our table does), its sensitivity pass on `--budget-samples` x `--budget-length` tokens.
- `dwq`: `mlx_lm.quant.dwq.dwq_quantize`: mlx-lm's RTN model distilled towards the float32 model's
  logits (their loss, Adam, temperature 2) on `--dwq-samples` windows, one epoch; scales kept in
  float32 (`dtype`).

mlx-lm's `load_data` downloads a text from the internet; here every method gets the same
calibration tokens instead: our builtin set (`gemma_mlx.convert.calibration`, Python stdlib docs
and code) tokenized by our processor, windows of `--length` tokens (BOS first). The offline
default checkpoint stores our tensor names, which `mlx_lm.load` refuses, so the mlx-lm model is
built from its config (`mlx_lm.utils._get_classes`) and given the weights renamed to mlx-lm's.

Evaluation is benchmarks/calibrated_quality.py's: the quantized model is written with mlx-lm's
`save_model`/`save_config`, loaded by `gemma_mlx.checkpoint.load_model`, its Linears run in numpy
on the dequantized weights (`host_linears`), and compared (`gemma_mlx.quality.compare`) with the
float32 model on the first `--tokens` tokens of benchmarks/data/genesis_kjv.txt (held out;
`--eval-text FILE` measures on another UTF-8 text instead, e.g. Python source in the
calibration's own domain).
Bits per weight count bfloat16 scales, biases and float parts (as shipped), like that table.

Every method runs in a fresh subprocess (clean peak memory, a failure or `--timeout` costs one row)
with opencv-python's OpenBLAS in LD_PRELOAD when present (MLX's CPU wheel uses the netlib reference
BLAS; benchmarks/results/openblas_cpu.md) and `OPENBLAS_NUM_THREADS` (`--blas-threads`). Results are
merged into `--json` by method, and the Markdown table is written from all of them.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("rtn", "mlx-lm-rtn", "gptq", "ours-gptq", "awq", "ours-awq", "dynamic", "budget", "dwq")
LABELS = {
    "rtn": "RTN 4-bit g64 (ours)",
    "mlx-lm-rtn": "RTN 4-bit g64 (mlx-lm quantize_model)",
    "gptq": "mlx-lm GPTQ 4-bit g64",
    "ours-gptq": "GPTQ 4-bit g64 (ours)",
    "awq": "mlx-lm AWQ 4-bit g64",
    "ours-awq": "AWQ 4-bit g64 (ours)",
    "dynamic": "mlx-lm dynamic quant 4/5-bit g64",
    "budget": "ours: --bits-per-weight budget (RTN, 3/4/5/6/8-bit)",
    "dwq": "mlx-lm DWQ 4-bit g64",
}
BITS, GROUP = 4, 64
RESULTS = Path(__file__).parent / "results"
TEXT = Path(__file__).parent / "data" / "genesis_kjv.txt"


def calibration_tokens(processor, samples: int, length: int):
    """The builtin calibration set as one `[samples, length]` int32 array (all windows full)."""
    import mlx.core as mx

    from gemma_mlx.convert.calibration import calibration_set

    windows = [s.ids for s in calibration_set(processor, "builtin", samples, length)]
    if len(windows) != samples or any(len(w) != length for w in windows):
        raise ValueError(
            f"builtin calibration set gave {len(windows)} windows of lengths "
            f"{sorted({len(w) for w in windows})}, expected {samples} x {length}"
        )
    return mx.array(windows, dtype=mx.int32)


def mlx_lm_model(path: Path):
    """mlx-lm's model for the checkpoint at `path` (float32, evaluated) and its config dict."""
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    from gemma_mlx.checkpoint import read_weights

    config = json.loads((path / "config.json").read_text())
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = {"model." + k.removeprefix("language_model."): v for k, v in read_weights(path).items()}
    model.load_weights(list(model.sanitize(weights).items()))
    model.eval()
    mx.eval(model.parameters())
    return model, config


def bits_per_weight(model, float_bits: int = 16) -> float:
    """mlx-lm's `compute_bits_per_weight` with every float tensor counted at `float_bits`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import get_total_parameters

    bits = sum(
        p.nbytes * 8 if not mx.issubdtype(p.dtype, mx.floating) else p.size * float_bits
        for _, p in tree_flatten(model.parameters())
    )
    return bits / get_total_parameters(model)


def quantize(method: str, model, config: dict, processor, args) -> tuple[object, dict, dict]:
    """Run mlx-lm's `method` on `model` -> (quantized model, config, notes for the table)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import compute_bits_per_weight, quantize_model

    def recorded(model) -> dict:
        # awq.update_config's per-layer block, without importing awq for the other methods
        q: dict = {"group_size": GROUP, "bits": BITS}

        def record(path, m):
            q[path] = {"group_size": m.group_size, "bits": m.bits} if hasattr(m, "bits") else False

        tree_map_with_path(record, model.leaf_modules(), is_leaf=nn.Module.is_module)
        return {**config, "quantization": q}

    notes: dict = {}
    if method == "mlx-lm-rtn":
        model, config = quantize_model(model, config, group_size=GROUP, bits=BITS)
        return model, config, notes
    if method == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        data = calibration_tokens(processor, args.samples, args.length)
        notes["calibration"] = f"{args.samples} x {args.length}"
        gptq_quantize(model.model, data, BITS, GROUP, fallback_bits=BITS, fallback_group_size=GROUP)
        return model, recorded(model), notes
    if method == "awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize

        data = calibration_tokens(processor, args.awq_samples, args.length)
        notes["calibration"] = f"{args.awq_samples} x {args.length}, grid {args.awq_grid}"
        awq_quantize(
            model,
            data,
            AWQ_MODEL_CONFIGS[config["model_type"]],
            group_size=GROUP,
            bits=BITS,
            embed_group_size=GROUP,
            embed_bits=BITS,
            n_grid=args.awq_grid,
        )
        return model, recorded(model), notes
    if method == "dynamic":
        from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold

        data = calibration_tokens(processor, args.dynamic_samples, args.length)
        high = 5
        sens = dict(
            estimate_sensitivities(model, data, BITS, GROUP, high, GROUP, batch_size=args.dynamic_batch)
        )
        # mlx-lm counts the stored float32 scales; ours counts bf16: shift the target by the
        # difference of the two counts on the plain 4-bit model (0.5 at group 64)
        probe = copy.deepcopy(model)
        nn.quantize(probe, group_size=GROUP, bits=BITS)
        offset = compute_bits_per_weight(probe) - bits_per_weight(probe)
        del probe
        threshold = estimate_threshold(model, sens, args.target_bpw + offset, BITS, GROUP, high, GROUP)

        def predicate(path, m):
            if not hasattr(m, "to_quantized"):
                return False
            return {"bits": high, "group_size": GROUP} if sens[path] > threshold else True

        model, config = quantize_model(model, config, group_size=GROUP, bits=BITS, quant_predicate=predicate)
        high_layers = sorted(p for p, s in sens.items() if s > threshold)
        notes["calibration"] = f"{args.dynamic_samples} x {args.length}, batch {args.dynamic_batch}"
        notes["target_bpw"] = args.target_bpw
        notes["mlx_lm_bpw_float32_scales"] = round(compute_bits_per_weight(model), 4)
        notes["high_bits_layers"] = high_layers
        return model, config, notes
    if method == "dwq":
        import mlx.optimizers as optimizers
        from mlx_lm.quant.dwq import dwq_quantize

        n_train, n_valid = args.dwq_samples, args.dwq_batch
        tokens = calibration_tokens(processor, n_train + n_valid, args.length).tolist()
        train = [(t, 0) for t in tokens[:n_train]]
        valid = [(t, 0) for t in tokens[n_train:]]
        student = copy.deepcopy(model)
        student, config = quantize_model(student, config, group_size=GROUP, bits=BITS)
        opt = optimizers.Adam(learning_rate=args.dwq_lr, bias_correction=True)
        dwq_quantize(
            student,
            lambda batch, idx, split: model(batch),
            opt,
            train,
            valid,
            batch_size=args.dwq_batch,
            max_seq_length=args.length,
            seed=123,
            dtype=mx.float32,
        )
        notes["calibration"] = (
            f"{n_train} x {args.length} train + {n_valid} valid, batch {args.dwq_batch}, "
            f"{n_train // args.dwq_batch} steps, lr {args.dwq_lr}"
        )
        return student, config, notes
    raise ValueError(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")


def worker(method: str, args) -> dict:
    """Quantize with `method` and evaluate -> the row's measurements."""
    import mlx.core as mx
    from calibrated_quality import host_linears
    from mlx_lm.utils import save_config, save_model

    from gemma_mlx import load
    from gemma_mlx.checkpoint import load_model
    from gemma_mlx.convert import convert
    from gemma_mlx.convert.default_model import default_model_path
    from gemma_mlx.processor import Processor
    from gemma_mlx.quality import compare, log_probs

    mx.random.seed(123)
    path = default_model_path()
    processor = Processor.from_dir(path)
    row: dict = {"method": method, "label": LABELS[method], "notes": {}, "eval_text": args.eval_text.name}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        if method in ("rtn", "budget", "ours-awq", "ours-gptq"):
            kwargs: dict = {}
            if method.startswith("ours-"):  # the same calibration tokens as mlx-lm's row
                calibrate = importlib.import_module("gemma_mlx.convert.calibrate")
                calibrate.AWQ_GRID = args.awq_grid
                samples = args.awq_samples if method == "ours-awq" else args.samples
                kwargs = dict(
                    method=method.removeprefix("ours-"),
                    calibration_samples=samples,
                    calibration_length=args.length,
                )
                row["notes"] = {"calibration": f"{samples} x {args.length}"}
            if method == "budget":
                # the sensitivity pass's calibration size is a module setting (8 x 128 by default)
                convert_module = importlib.import_module("gemma_mlx.convert.convert")  # not the function
                convert_module.SENSITIVITY_SAMPLES = args.budget_samples
                convert_module.SENSITIVITY_LENGTH = args.budget_length
                # the budget counts the stored float bytes: bf16 scales make it our bf16 count
                kwargs = dict(bits_per_weight=args.target_bpw, dtype="bfloat16")
                row["notes"] = {
                    "calibration": f"sensitivity {args.budget_samples} x {args.budget_length}, bf16 scales",
                    "target_bpw": args.target_bpw,
                }
            mx.reset_peak_memory()
            t = time.perf_counter()
            report = convert(path, out, bits=BITS, group_size=GROUP, progress=False, **kwargs)
            row["seconds"] = time.perf_counter() - t
            if report.allocation:
                row["notes"]["allocation"] = [list(r) for r in report.allocation]
        else:
            model, config = mlx_lm_model(path)
            mx.reset_peak_memory()
            t = time.perf_counter()
            model, config, row["notes"] = quantize(method, model, config, processor, args)
            mx.eval(model.parameters())
            row["seconds"] = time.perf_counter() - t
            save_model(out, model)
            save_config(config, out / "config.json")
            del model
        row["mlx_peak_gb"] = mx.get_peak_memory() / 1e9
        row["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        variant = load_model(out)
        row["bpw_bf16"] = bits_per_weight(variant)
        row["bpw_stored"] = bits_per_weight(variant, 32)  # float32 scales/biases, as this run keeps them
        ids = processor.encode_prompt(args.eval_text.read_text(encoding="utf-8"))[: args.tokens]
        var_lp = log_probs(host_linears(variant), ids)
        del variant
    reference, _ = load(path)
    ref_lp = log_probs(host_linears(reference), ids)
    q = compare(ref_lp, var_lp, ids)
    row.update(
        perplexity=q.perplexity,
        top1_agreement=q.top1_agreement,
        mean_kl=q.mean_kl,
        float_perplexity=compare(ref_lp, ref_lp, ids).perplexity,
        tokens=len(ids),
    )
    return row


def openblas() -> Path | None:
    from openblas_cpu import found_libraries

    libs = found_libraries()
    return libs[0] if libs else None


def table(results: dict, args) -> str:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    import mlx.core as mx
    import mlx_lm

    ok = [r for r in results.values() if "error" not in r]
    float_ppl = ok[0]["float_perplexity"] if ok else float("nan")
    tokens = ok[0]["tokens"] if ok else args.tokens
    lines = [
        f"Gemma 3 270M (offline default model, float32), {tokens} held-out tokens of "
        f"{args.eval_text.name}, float32 model as the reference; calibration: our builtin "
        "set (Python stdlib docs and code) for every method (sizes per row). Affine, group 64, "
        "embedding (the tied LM head) included, float32 scales/biases in the run unless the row says "
        "otherwise; bits/weight counted with bfloat16 scales, biases and float parts, as shipped. "
        f"MLX {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
        f"{platform.machine()} CPU, 2 shared cores, load at writing: `{uptime}`.",
        "",
        "| method | bits/weight (bf16) | perplexity | top-1 agreement | mean KL (nats) | calibration | "
        "conversion (s) | MLX peak (GB) | max RSS (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| float32 (reference) | 32.00 | {float_ppl:.3f} | 1.000 | 0 | - | - | - | - |",
    ]
    for m in METHODS:
        r = results.get(m)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {LABELS[m]} | - | - | - | - | failed: `{r['error']}` | - | - | - |")
            continue
        lines.append(
            f"| {r['label']} | {r['bpw_bf16']:.3f} | {r['perplexity']:.3f} | {r['top1_agreement']:.3f} | "
            f"{r['mean_kl']:.4f} | {r['notes'].get('calibration', '-')} | {r['seconds']:.0f} | "
            f"{r['mlx_peak_gb']:.2f} | {r['max_rss_gb']:.1f} |"
        )
    if (r := results.get("dynamic")) and "error" not in r:
        high = r["notes"]["high_bits_layers"]
        kinds: dict[str, int] = {}
        for p in high:
            kind = p.rsplit(".", 1)[-1]
            kinds[kind] = kinds.get(kind, 0) + 1
        lines += [
            "",
            f"Dynamic quant: target {r['notes']['target_bpw']} bits/weight (bf16 count; mlx-lm's own count "
            f"with the float32 scales: {r['notes']['mlx_lm_bpw_float32_scales']}), reached "
            f"{r['bpw_bf16']:.3f}; {len(high)} layers at 5 bits ("
            + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            + "), the rest (embedding included) at 4 bits.",
        ]
    if (r := results.get("budget")) and "error" not in r:
        lines += [
            "",
            f"Our budget: target {r['notes']['target_bpw']} bits/weight, reached {r['bpw_bf16']:.3f}; "
            + "; ".join(f"{spec}: {units}" for spec, units in r["notes"].get("allocation", [])),
        ]
    lines += ["", "Commands (per method, merged by method into the JSON beside this file):", ""]
    lines += [f"- {LABELS[m]}: `{results[m]['command']}`" for m in METHODS if m in results]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--tokens", type=int, default=512, help="held-out evaluation tokens")
    ap.add_argument("--eval-text", type=Path, default=TEXT, help="evaluation text (default: KJV Genesis)")
    ap.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows")
    ap.add_argument("--length", type=int, default=256, help="calibration window length (tokens)")
    ap.add_argument("--awq-samples", type=int, default=8)
    ap.add_argument("--awq-grid", type=int, default=10, help="AWQ scale/clip grid (mlx-lm default 20)")
    ap.add_argument("--dynamic-samples", type=int, default=8)
    ap.add_argument("--dynamic-batch", type=int, default=2, help="sensitivity batch (mlx-lm default 4)")
    ap.add_argument("--target-bpw", type=float, default=4.75, help="dynamic quant target (bf16 count)")
    ap.add_argument("--budget-samples", type=int, default=1, help="our budget's sensitivity windows")
    ap.add_argument("--budget-length", type=int, default=32, help="their length (convert's default: 8 x 128)")
    ap.add_argument("--dwq-samples", type=int, default=8, help="DWQ training windows (one epoch)")
    ap.add_argument("--dwq-batch", type=int, default=2, help="DWQ batch size (also the validation windows)")
    ap.add_argument("--dwq-lr", type=float, default=1e-6, help="DWQ learning rate (mlx-lm default 1e-6)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per method")
    ap.add_argument("--blas-threads", type=int, default=1, help="OPENBLAS_NUM_THREADS for the workers")
    ap.add_argument("--no-openblas", action="store_true", help="keep MLX's own reference BLAS")
    ap.add_argument("--json", type=Path, default=RESULTS / "peer_quant_gemma3_270m.json")
    ap.add_argument("--out", type=Path, default=None, help="Markdown table (default: print only)")
    ap.add_argument("--table-only", action="store_true", help="only write the table from --json")
    ap.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    counts = (
        "tokens",
        "samples",
        "awq_samples",
        "awq_grid",
        "dynamic_samples",
        "dynamic_batch",
        "dwq_samples",
        "dwq_batch",
    )
    for name in counts:
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.length < 2:
        ap.error("--length must be >= 2")
    if not args.eval_text.is_file():
        ap.error(f"--eval-text {args.eval_text}: no such file")

    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return

    if args.table_only:
        if not args.json.is_file():
            ap.error(f"--table-only: {args.json} does not exist")
        text = table(json.loads(args.json.read_text()), args)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return

    env = dict(os.environ)
    lib = None if args.no_openblas else openblas()
    if lib is not None:
        env["LD_PRELOAD"] = str(lib)
        env["OPENBLAS_NUM_THREADS"] = str(args.blas_threads)
    print(f"BLAS for the workers: {lib or 'MLX reference BLAS'}", flush=True)
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    passthrough = sys.argv[1:]
    for method in args.methods:
        command = f"python benchmarks/peer_quant.py {' '.join(passthrough)}"
        t = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, __file__, *passthrough, "--worker", method],
                env=env,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
        except subprocess.TimeoutExpired:
            row = {"error": f"timed out after {args.timeout:.0f} s"}
        else:
            found = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode == 0 and found:
                row = json.loads(found[-1].removeprefix("RESULT "))
            else:
                err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                row = {"error": err[-1] if err else f"exit status {proc.returncode}"}
                sys.stderr.write(proc.stderr[-4000:])
        row.update(command=command, wall_s=time.perf_counter() - t, blas=str(lib) if lib else "reference")
        results[method] = row
        print(method, json.dumps(row), flush=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        text = table(results, args)
        if args.out:
            args.out.write_text(text + "\n")
    print(table(results, args))


if __name__ == "__main__":
    main()
